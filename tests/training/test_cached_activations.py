"""The plugin's gated SAE trained from SAELens's activation cache, in one process."""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from safetensors.torch import load_file

from sae_lens_gated import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.training.cached_activations import (
    CACHE_ROW_KEY,
    check_cached_activations,
    keep_cache_position,
    tokens_needed,
)
from sae_lens_gated.training.conventions import RESAMPLER_STATE_FILENAME
from tests.helpers import (
    DEVICES,
    max_norm_error,
    tiny_model,
    tiny_runner_dict,
    tiny_token_dataset,
    write_activation_cache,
)


@pytest.fixture
def activation_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny model's activations over the 400 sequences of the tiny token dataset."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    return write_activation_cache(tmp_path / "cache", monkeypatch)


def _cfg(tmp_path: Path, cache: Path | None, **overrides: Any) -> Any:
    cached = {"use_cached_activations": True, "cached_activations_path": str(cache)}
    return LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(tmp_path, **(cached if cache else {}), **overrides)
    )


def _train(cfg: Any, sae: GatedTrainingSAE | None = None) -> GatedTrainingSAE:
    torch.manual_seed(0)  # the same shuffles in SAELens's mixing buffer
    runner = LanguageModelSAETrainingRunner(
        cfg,
        override_model=tiny_model().to(cfg.device),
        # SAELens wants the token dataset with a cache too (its evaluations read it).
        override_dataset=tiny_token_dataset(),
        override_sae=sae,
    )
    reads_cache = runner.activations_store.cached_activation_dataset is not None
    assert reads_cache == cfg.use_cached_activations
    trained = runner.run()
    assert isinstance(trained, GatedTrainingSAE)
    return trained


def test_cached_activations_train_the_same_sae_as_the_model_s_activations(
    tmp_path: Path, activation_cache: Path
):
    float64: dict[str, Any] = {"sae": {"dtype": "float64"}, "dtype": "float64"}
    start = GatedTrainingSAE(
        GatedTrainingSAEConfig(d_in=32, d_sae=128, l1_coefficient=0.5, dtype="float64")
    )
    initial = {k: v.clone() for k, v in start.state_dict().items()}

    def copy_of_start() -> GatedTrainingSAE:
        sae = GatedTrainingSAE(start.cfg)
        sae.load_state_dict(initial)
        return sae

    live = _train(_cfg(tmp_path / "live", None, **float64), copy_of_start())
    cached = _train(
        _cfg(tmp_path / "cached", activation_cache, **float64), copy_of_start()
    )
    for name, value in live.state_dict().items():
        assert not torch.equal(value, initial[name]), name  # it trained
        torch.testing.assert_close(cached.state_dict()[name], value, atol=1e-12, rtol=0)
    assert max_norm_error(cached.W_dec) <= 1e-12


_RESAMPLING = {
    "resample_every": 20,
    "resample_window": 10,
    "resample_pool_size": 256,
    "resample_lr_warmup_steps": 5,
    "l1_coefficient": 20.0,
}


@pytest.mark.parametrize("device", DEVICES)
def test_cached_activations_resample_and_resume(
    tmp_path: Path, activation_cache: Path, device: str
):
    first = _cfg(
        tmp_path,
        activation_cache,
        sae=_RESAMPLING,
        lr=1e-2,
        training_tokens=64 * 50,
        n_checkpoints=1,
        device=device,
    )
    sae = _train(first)
    assert sae.W_dec.device.type == device
    assert sae.conventions.resampler is not None
    assert sae.conventions.resampler.n_events == 2
    assert sae.conventions.resampler.n_resampled > 0
    (mid,) = Path(first.checkpoint_path).iterdir()
    state = load_file(mid / RESAMPLER_STATE_FILENAME)
    assert int(state["completed_steps"]) == 26

    resumed = _train(
        _cfg(
            tmp_path,
            activation_cache,
            sae=_RESAMPLING,
            lr=1e-2,
            training_tokens=64 * 70,
            resume_from_checkpoint=str(mid),
            output_path=str(tmp_path / "resumed"),
            device=device,
        )
    )
    assert resumed.W_dec.device.type == device
    assert resumed.conventions.resampler is not None
    # 26 steps before the checkpoint, 44 after: events at steps 20, 40 and 60.
    assert resumed.conventions.resampler.completed_steps == 70
    assert resumed.conventions.resampler.n_events == 3
    assert max_norm_error(resumed.W_dec) <= 1e-5


# ---- a cache that does not fit the run ---------------------------------------------------


def test_a_cached_activations_folder_that_does_not_exist_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="no activation cache at .*nowhere"):
        check_cached_activations(_cfg(tmp_path, tmp_path / "nowhere"))


def test_a_folder_that_is_not_a_cached_activations_dataset_is_refused(tmp_path: Path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match="is not an activation cache"):
        check_cached_activations(_cfg(tmp_path, tmp_path / "other"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"hook_name": "blocks.1.hook_resid_post"},
            "holds 'blocks.0.hook_resid_post', not the hook of this run, "
            "'blocks.1.hook_resid_post'",
        ),
        ({"sae": {"d_in": 16}}, r"shape \(16, 32\) .* = \(16, 16\)"),
        ({"context_size": 8}, r"shape \(16, 32\) .* = \(8, 32\)"),
    ],
)
def test_cached_activations_of_another_hook_width_or_context_are_refused(
    tmp_path: Path, activation_cache: Path, overrides: dict[str, Any], message: str
):
    with pytest.raises(ValueError, match=message):
        check_cached_activations(_cfg(tmp_path, activation_cache, **overrides))


@pytest.fixture
def small_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """40 sequences of 16 tokens: 640 tokens, in 5 batches of 8 sequences."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    return write_activation_cache(tmp_path / "small", monkeypatch, n_rows=40)


def test_a_cached_activations_cache_too_small_for_the_run_is_refused(
    tmp_path: Path, small_cache: Path
):
    # 9 steps of 64 tokens and the 64 the mixing buffer keeps (8 x 16 x 0.5): all 640.
    fits = _cfg(tmp_path, small_cache, training_tokens=64 * 9)
    assert tokens_needed(fits) == 640
    check_cached_activations(fits)
    too_many = _cfg(tmp_path, small_cache, training_tokens=64 * 10)
    with pytest.raises(
        ValueError,
        match=r"too small .* 40 sequences of 16 tokens give 640 tokens in whole batches "
        r"of 8 sequences .* reads 704",
    ):
        check_cached_activations(too_many)
    # The normalization estimate draws its batches from the cache too.
    estimated = _cfg(
        tmp_path,
        small_cache,
        training_tokens=64 * 5,
        n_batches_for_norm_estimate=5,
        sae={"normalize_activations": "expected_average_only_in"},
    )
    assert tokens_needed(estimated) == 64 * 10 + 64
    with pytest.raises(ValueError, match="reads 704"):
        check_cached_activations(estimated)
    # Two processes each read their share: 20 sequences, 16 of them in whole batches.
    with pytest.raises(ValueError, match="give 256 tokens for each of 2 processes"):
        check_cached_activations(fits, n_processes=2)


def test_cached_activations_are_read_whole_sequences_with_a_seqpos_slice(
    tmp_path: Path, small_cache: Path
):
    # SAELens checks and reads cached sequences at context_size, whatever seqpos_slice
    # says; only its mixing buffer is sized in sliced sequences (8 x 12 x 0.5 = 48 tokens).
    cfg = _cfg(tmp_path, small_cache, training_tokens=64 * 9, seqpos_slice=(2, 14))
    assert tokens_needed(cfg) == 64 * 9 + 48
    check_cached_activations(cfg)


def test_a_run_without_cached_activations_is_not_checked(tmp_path: Path):
    check_cached_activations(_cfg(tmp_path, None, cached_activations_path="nowhere"))


def _rows_read(store: Any) -> list[int]:
    """Record the first cache row of every batch ``store`` reads."""
    rows: list[int] = []
    read = store._load_raw_llm_batch_from_cached

    def recording(*args: Any, **kwargs: Any) -> Any:
        rows.append(store.current_row_idx)
        return read(*args, **kwargs)

    store._load_raw_llm_batch_from_cached = recording
    return rows


def test_cached_activations_resume_at_the_row_after_the_checkpoint(
    tmp_path: Path, activation_cache: Path
):
    first_cfg = _cfg(tmp_path, activation_cache, n_checkpoints=1)
    first = LanguageModelSAETrainingRunner(
        first_cfg, override_model=tiny_model(), override_dataset=tiny_token_dataset()
    )
    keep_cache_position(first, tiny_token_dataset())
    first_rows = _rows_read(first.activations_store)
    first.run()
    (mid,) = Path(first_cfg.checkpoint_path).iterdir()
    state = load_file(mid / "activations_store_state.safetensors")
    next_row = int(state[CACHE_ROW_KEY])
    assert next_row in [r + 8 for r in first_rows]  # batches of 8 sequences
    read_before = [r for r in first_rows if r < next_row]

    resumed = LanguageModelSAETrainingRunner(
        _cfg(tmp_path, activation_cache, resume_from_checkpoint=str(mid)),
        override_model=tiny_model(),
        override_dataset=tiny_token_dataset(),
    )
    keep_cache_position(resumed, tiny_token_dataset())
    resumed_rows = _rows_read(resumed.activations_store)
    resumed.run()
    # It reads on from where the checkpoint stopped: no row of the epoch twice.
    assert resumed_rows[0] == next_row
    assert not set(read_before) & set(resumed_rows)
    assert resumed_rows == list(range(next_row, next_row + 8 * len(resumed_rows), 8))
