import os

# Tests never talk to W&B or the HF hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import huggingface_hub  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache, offline: fill it with ``populate_hub_cache``."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both variables once, when it is imported.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def cuda_tests_run_on_the_gpu(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test's ``cuda`` parameter must put work on the GPU (see ``uses_the_gpu``)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("device") != "cuda":
        yield
        return
    from tests.helpers import uses_the_gpu

    with uses_the_gpu(request.node.name):
        yield


@pytest.fixture(autouse=True)
def empty_working_directory(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test runs in a new empty folder: the checkout, where a user may have run the
    demo (``./gated-demo``), is never read or written through relative paths."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B in offline mode writing under tmp_path (its settings are re-read per test)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()
    return tmp_path


@pytest.fixture
def wandb_log_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every ``wandb.log`` payload, in order, as it is handed to W&B (which still gets it).

    ``wandb.init`` rebinds the module-level ``wandb.log`` to the new run's ``log``, so the
    run class's method is wrapped.
    """
    from wandb.sdk.wandb_run import Run

    calls: list[dict[str, Any]] = []
    real_log = Run.log

    def log(run: Run, data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        calls.append({**data, "_step": kwargs.get("step")})
        real_log(run, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", log)
    return calls
