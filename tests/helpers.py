"""Builders and a plain reference implementation of the paper's loss, shared by tests."""

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import SAE, TrainStepInput

from sae_lens_gated import GatedTrainingSAEConfig

GATED_PARAM_NAMES = ["W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"]

# What a test's CUDA variant carries: the ``cuda`` marker (select those with ``pytest -m
# cuda``), and a skip with its reason on a machine without a GPU.
CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
# The devices the equivalence tests run on: the CPU always, CUDA where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def gpu_allocations() -> int:
    """How many allocations PyTorch's CUDA allocator has made in this process."""
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


@contextlib.contextmanager
def uses_the_gpu(
    name: str, allocations: Callable[[], int] = gpu_allocations
) -> Iterator[None]:
    """Fail ``name`` if it allocated nothing on the GPU: a CUDA test that did ran on the
    CPU (as when SAELens's trainer moved its SAE to its own config's device), and must not
    pass silently."""
    before = allocations()
    yield
    if allocations() == before:
        pytest.fail(f"{name} allocated nothing on the GPU: it ran on the CPU")


def float32_tolerance(device: str, cpu: float) -> float:
    """A float32 tolerance checked as ``cpu`` on the CPU, 10x looser on CUDA: cuBLAS sums
    in other orders than the CPU (float64 tolerances need no loosening)."""
    return cpu if device == "cpu" else 10 * cpu


def max_norm_error(W_dec: torch.Tensor) -> float:
    """The largest distance of a decoder row's norm from 1."""
    return float((W_dec.detach().norm(dim=1) - 1).abs().max())


def history_of(calls: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every logged value of each W&B key, in order (``calls``: the wandb_log_calls fixture)."""
    history: dict[str, list[Any]] = {}
    for call in calls:
        for key, value in call.items():
            history.setdefault(key, []).append(value)
    return history


def step_input(x: torch.Tensor, l1: float = 0.5) -> TrainStepInput:
    """A training-step input with L1 coefficient ``l1`` at a non-logging step 0."""
    return TrainStepInput(
        sae_in=x,
        coefficients={"l1": l1},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


def build_gated_training_cfg(**kwargs: Any) -> GatedTrainingSAEConfig:
    defaults: dict[str, Any] = {"d_in": 16, "d_sae": 48}
    defaults.update(kwargs)
    return GatedTrainingSAEConfig(**defaults)


@torch.no_grad()
def randomize_gated_params(sae: Any, seed: int = 0, unit_decoder: bool = False) -> None:
    """Give every gated parameter a generic random value (biases and r_mag non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    W_dec = torch.randn(d_sae, d_in, generator=gen) * 0.3
    if unit_decoder:
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    sae.W_dec.data.copy_(W_dec)
    sae.W_enc.data.copy_(torch.randn(d_in, d_sae, generator=gen) * 0.3)
    sae.b_dec.data.copy_(torch.randn(d_in, generator=gen) * 0.2)
    sae.b_gate.data.copy_(torch.randn(d_sae, generator=gen) * 0.2)
    sae.b_mag.data.copy_(torch.randn(d_sae, generator=gen) * 0.2)
    if hasattr(sae, "r_mag"):  # absent from the untied ablation
        sae.r_mag.data.copy_(torch.randn(d_sae, generator=gen) * 0.3)


def copy_params(source: SAE[Any], target: SAE[Any]) -> None:
    target.load_state_dict(
        {k: v.clone() for k, v in source.state_dict().items()}, strict=True
    )


def reference_paper_losses(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    l1_coefficient: float,
    aux_coefficient: float = 1.0,
    apply_b_dec_to_input: bool = True,
    freeze_decoder_in_aux: bool = True,
    l1_scale_by_decoder_norm: bool = False,
) -> dict[str, torch.Tensor]:
    """Paper App. G written out plainly: separate W_gate / W_mag matmuls, no sharing.

    ``W_mag`` is ``exp(r_mag) * W_gate`` unless ``params`` has its own ``W_mag`` (untied).
    """
    W_gate, W_dec = params["W_enc"], params["W_dec"]
    b_dec, b_gate, b_mag = params["b_dec"], params["b_gate"], params["b_mag"]
    r_mag = params.get("r_mag")
    if "W_mag" in params:
        W_mag = params["W_mag"]
    else:
        assert r_mag is not None
        W_mag = W_gate * torch.exp(r_mag)[None, :]
    x_center = x - b_dec if apply_b_dec_to_input else x
    active = (x_center @ W_gate + b_gate > 0).float()
    mags = torch.relu(x_center @ W_mag + b_mag)
    x_hat = (active * mags) @ W_dec + b_dec
    reconstruct = ((x_hat - x) ** 2).sum(-1).mean()
    via_gate = torch.relu(x_center @ W_gate + b_gate)
    weights = W_dec.norm(dim=1) if l1_scale_by_decoder_norm else torch.ones_like(b_gate)
    sparsity = l1_coefficient * (via_gate * weights).sum(-1).mean()
    W_aux = W_dec.detach() if freeze_decoder_in_aux else W_dec
    b_aux = b_dec.detach() if freeze_decoder_in_aux else b_dec
    aux = aux_coefficient * ((via_gate @ W_aux + b_aux - x) ** 2).sum(-1).mean()
    return {
        "mse_loss": reconstruct,
        "l1_loss": sparsity,
        "auxiliary_reconstruction_loss": aux,
    }


class SparseSyntheticData:
    """Endless stream of batches built from random sparse codes over fixed directions."""

    def __init__(
        self,
        d_in: int,
        n_features: int = 64,
        batch_size: int = 128,
        p_fire: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        directions = torch.randn(n_features, d_in, generator=self.gen)
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        self.batch_size, self.p_fire = batch_size, p_fire
        self.on_next: list[Any] = []

    def __iter__(self) -> "SparseSyntheticData":
        return self

    def __next__(self) -> torch.Tensor:
        for callback in self.on_next:
            callback()
        n = self.directions.shape[0]
        fires = torch.rand(self.batch_size, n, generator=self.gen) < self.p_fire
        mags = 1.0 + 0.2 * torch.rand(self.batch_size, n, generator=self.gen)
        return (fires * mags) @ self.directions


def make_trainer(
    sae: Any, data: Any, steps: int, batch_size: int = 128, **kwargs: Any
) -> Any:
    """SAELens's ``SAETrainer`` as the harness configures it (``trainer_config``), with no
    learning-rate warm-up and dead-feature windows longer than the tests' runs.

    ``lr`` (default 3e-3) and any other ``SAETrainerConfig`` field can be overridden. The
    trainer runs on the SAE's device: SAELens's moves the SAE to its config's device, which
    would otherwise run a CUDA test's SAE on the CPU.
    """
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_lens_gated.repro.experiments import TrainingSettings, trainer_config

    settings = TrainingSettings(
        steps=steps,
        batch_size=batch_size,
        lr=kwargs.pop("lr", 3e-3),
        device=str(kwargs.pop("device", sae.cfg.device)),
    )
    overrides: dict[str, Any] = {
        "lr_warm_up_steps": 0,
        "dead_feature_window": 1000,
        "feature_sampling_window": 1000,
        **kwargs,
    }
    return SAETrainer(
        cfg=trainer_config(settings, **overrides), sae=sae, data_provider=data
    )


def tiny_model(model_class: Any = None) -> Any:
    """A 2-layer HookedTransformer (or ``model_class``) with random weights, built from a
    config (no download)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return (model_class or HookedTransformer)(
        HookedTransformerConfig(
            n_layers=2,
            d_model=32,
            n_ctx=16,
            d_head=8,
            n_heads=4,
            d_mlp=64,
            d_vocab=128,
            act_fn="gelu",
            normalization_type="LN",
            device="cpu",
            seed=0,
        )
    )


def tiny_token_dataset(n_rows: int = 400, context_size: int = 16, seed: int = 0) -> Any:
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (n_rows, context_size), generator=gen)
    return Dataset.from_dict({"tokens": tokens.tolist()})


def tiny_runner_dict(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """A LanguageModelSAERunnerConfig dict for the tiny model (no W&B unless overridden)."""
    sae = {"architecture": "gated", "d_in": 32, "d_sae": 128, "l1_coefficient": 0.5}
    sae.update(overrides.pop("sae", {}))
    logger = {"log_to_wandb": False, "wandb_project": "sae_lens_gated_tests"}
    logger.update(overrides.pop("logger", {}))
    cfg: dict[str, Any] = {
        "sae": sae,
        "logger": logger,
        "model_name": "tiny-random",
        "hook_name": "blocks.0.hook_resid_post",
        "dataset_path": "",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": 16,
        "prepend_bos": False,
        "training_tokens": 64 * 40,
        "train_batch_size_tokens": 64,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 8,
        "lr": 1e-3,
        "adam_beta1": 0.0,
        "device": "cpu",
        "n_eval_batches": 1,
        "eval_batch_size_prompts": 4,
        "dead_feature_window": 10,
        "feature_sampling_window": 20,
        "n_checkpoints": 0,
        "checkpoint_path": str(tmp_path / "checkpoints"),
        "output_path": str(tmp_path / "output"),
        "seed": 0,
        "verbose": False,
    }
    cfg.update(overrides)
    return cfg


def load_module(path: Path, name: str | None = None) -> ModuleType:
    """The Python file at ``path`` (a script or example, not a package module) imported
    as ``name`` (default its stem) and registered in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def dictionary_learning_module() -> Any:
    """dictionary_learning's own ``dictionary.py`` (``GatedAutoEncoder`` and friends).

    The package's ``__init__.py`` imports ``nnsight`` (a heavy, model-hosting dependency the
    tests do not install), so ``dictionary.py``, which needs only torch and einops, is
    loaded straight from the installed package directory instead: the real class, not a
    copy.
    """
    spec = importlib.util.find_spec("dictionary_learning")
    assert spec is not None and spec.submodule_search_locations is not None, (
        "dictionary-learning is not installed: pip install --no-deps --group references"
    )
    path = Path(next(iter(spec.submodule_search_locations))) / "dictionary.py"
    return load_module(path, "_dictionary_learning_dictionary")


@torch.no_grad()
def random_dictionary_learning_ae(
    d_in: int = 16, d_sae: int = 48, seed: int = 0
) -> Any:
    """dictionary_learning's real ``GatedAutoEncoder`` with generic random parameters.

    Decoder columns are left at non-unit norms and every bias and ``r_mag`` is non-zero, so
    no term of the forward pass can be dropped by mistake unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    ae = dictionary_learning_module().GatedAutoEncoder(d_in, d_sae)
    ae.encoder.weight.copy_(torch.randn(d_sae, d_in, generator=gen) * 0.3)
    ae.decoder.weight.copy_(torch.randn(d_in, d_sae, generator=gen) * 0.3)
    ae.decoder_bias.copy_(torch.randn(d_in, generator=gen) * 0.2)
    ae.gate_bias.copy_(torch.randn(d_sae, generator=gen) * 0.2)
    ae.mag_bias.copy_(torch.randn(d_sae, generator=gen) * 0.2)
    ae.r_mag.copy_(torch.randn(d_sae, generator=gen) * 0.3)
    return ae


def write_dictionary_learning_folder(
    path: Path, ae: Any, layer: int = 3, **trainer_overrides: Any
) -> Path:
    """Save ``ae`` the way dictionary_learning's ``trainSAE`` does (``ae.pt`` + ``config.json``).

    The config has the fields of ``GatedSAETrainer.config`` and ``ActivationBuffer.config``.
    """
    import json

    path.mkdir(parents=True, exist_ok=True)
    trainer = {
        "dict_class": "GatedAutoEncoder",
        "trainer_class": "GatedSAETrainer",
        "activation_dim": ae.activation_dim,
        "dict_size": ae.dict_size,
        "lr": 5e-5,
        "l1_penalty": 0.1,
        "warmup_steps": 1000,
        "sparsity_warmup_steps": 2000,
        "decay_start": None,
        "seed": 0,
        "device": "cuda:0",
        "layer": layer,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "wandb_name": "GatedSAETrainer-pythia70m",
        "submodule_name": f"resid_post_layer_{layer}",
    }
    trainer.update(trainer_overrides)
    buffer = {
        "d_submodule": ae.activation_dim,
        "io": "out",
        "n_ctxs": 2000,
        "ctx_len": 128,
        "refresh_batch_size": 24,
        "out_batch_size": 4096,
        "device": "cuda:0",
    }
    (path / "config.json").write_text(
        json.dumps({"trainer": trainer, "buffer": buffer}, indent=4)
    )
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, path / "ae.pt")
    return path


def assert_matches_dictionary_learning(sae: Any, ae: Any) -> None:
    """``sae`` computes the features and reconstructions of dictionary_learning's ``ae``.

    Up to float32 rounding: the two evaluate the encoder in different orders, which moves
    outputs of order 1 by a few 1e-6. A wrong gate or magnitude moves them by ~0.1.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, ae.activation_dim, generator=gen) * 2
    with torch.no_grad():
        expected_features, expected_out = ae.encode(x), ae(x)
        features, out = sae.encode(x), sae(x)
    # The test must be able to see a wrong gate or magnitude: many features fire.
    assert 0.2 < (expected_features > 0).float().mean() < 0.8
    torch.testing.assert_close(features, expected_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)


def write_saelens_folder(path: Path, seed: int = 0) -> Any:
    """Save a random plugin ``GatedSAE`` (d_in 16, d_sae 48) as a SAELens folder; return it."""
    from sae_lens_gated import GatedSAE, GatedSAEConfig

    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(sae, seed=seed)
    sae.save_model(path)
    return sae


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: it creates a file, as an attack could."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def write_malicious_ae_pt(folder: Path, marker: Path) -> None:
    """Replace ``folder``'s ``ae.pt`` by one whose unpickling creates the file ``marker``."""
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "payload": _CreatesFile(marker)}, folder / "ae.pt")


def populate_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay out ``files`` (repo path -> local file) as huggingface_hub's cache holds a repo.

    ``<cache>/models--<owner>--<name>/refs/main`` names a commit, ``blobs/<hash>`` holds each
    file and ``snapshots/<commit>/<repo path>`` links to its blob, which is all an offline
    ``hf_hub_download`` reads. Returns the snapshot folder.
    """
    import hashlib
    import os

    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    snapshot = repo_dir / "snapshots" / commit
    for repo_path, local in files.items():
        data = local.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / repo_path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


# SAELens's gated release, and where its first SAE lives on the hub.
GATED_RELEASE = "sae_bench_pythia70m_sweep_gated_ctx128_0730"
GATED_RELEASE_SAE_ID = "blocks.3.hook_resid_post__trainer_0"
GATED_RELEASE_REPO = "canrager/lm_sae"
GATED_RELEASE_FOLDER = "pythia70m_sweep_gated_ctx128_0730/resid_post_layer_3/trainer_0"


def populate_gated_release(cache_dir: Path, folder: Path) -> Path:
    """Put a dictionary_learning ``folder``'s two files in the cache as the release's SAE."""
    return populate_hub_cache(
        cache_dir,
        GATED_RELEASE_REPO,
        {f"{GATED_RELEASE_FOLDER}/{n}": folder / n for n in ("ae.pt", "config.json")},
    )


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (following links), keyed by relative path."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_activation_cache(
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    n_rows: int = 400,
    hook: str = "blocks.0.hook_resid_post",
) -> Path:
    """Cache the tiny model's activations at ``hook`` over the first ``n_rows`` sequences
    of the tiny token dataset, in order, with SAELens's ``CacheActivationsRunner``."""
    import sae_lens.cache_activations_runner as cache_runner
    from sae_lens.config import CacheActivationsRunnerConfig

    monkeypatch.setattr(cache_runner, "load_model", lambda **_: tiny_model())
    context, d_in = 16, 32
    tokens = n_rows * context
    cfg = CacheActivationsRunnerConfig(
        dataset_path="",
        model_name="tiny-random",
        model_batch_size=8,
        hook_name=hook,
        d_in=d_in,
        training_tokens=tokens,
        context_size=context,
        new_cached_activations_path=str(path),
        shuffle=False,
        device="cpu",
        prepend_bos=False,
        # One buffer holding every row (the default buffer is 2 GB, which it fills).
        buffer_size_gb=tokens * d_in * 4 / 1e9,
    )
    cache_runner.CacheActivationsRunner(
        cfg, override_dataset=tiny_token_dataset(n_rows)
    ).run()
    return path
