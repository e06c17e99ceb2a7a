"""SAELens's own MultiSAETrainingRunner training several plugin SAEs from one stream."""

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.multi_sae_training_runner import (
    MultiSAETrainingRunner,
    MultiSAETrainingRunnerConfig,
)
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from safetensors.torch import load_file
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from sae_lens_gated import GatedSAE, GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.training.conventions import RESAMPLER_STATE_FILENAME
from tests.helpers import (
    DEVICES,
    SparseSyntheticData,
    history_of,
    max_norm_error,
    tiny_model,
    tiny_runner_dict,
    tiny_token_dataset,
)

HOOK = "blocks.0.hook_resid_post"
# Enough lambda to kill features of the tiny model at lr 1e-2: resampling has work to do.
RESAMPLING: dict[str, Any] = {
    "resample_every": 20,
    "resample_window": 10,
    "resample_pool_size": 256,
    "resample_lr_warmup_steps": 5,
}


def _one_event(step: int) -> dict[str, Any]:
    """Resampling settings with one event, at ``step``."""
    return {**RESAMPLING, "resample_every": None, "resample_steps": [step]}


def _gated(d_sae: int = 128, **kwargs: Any) -> GatedTrainingSAEConfig:
    return GatedTrainingSAEConfig(d_in=32, d_sae=d_sae, **kwargs)


def _multi_cfg(
    tmp_path: Path, saes: dict[str, TrainingSAEConfig], **overrides: Any
) -> MultiSAETrainingRunnerConfig:
    """The tiny single-runner settings (tests.helpers) as a multi-runner config."""
    settings = tiny_runner_dict(tmp_path, **overrides)
    for single_only in ("sae", "is_dataset_tokenized", "verbose"):
        settings.pop(single_only)
    return MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names=settings.pop("hook_name"),
        logger=LoggingConfig(**settings.pop("logger")),
        **settings,
    )


def _runner(
    cfg: MultiSAETrainingRunnerConfig, saes: dict[str, TrainingSAE[Any]] | None = None
) -> MultiSAETrainingRunner:
    return MultiSAETrainingRunner(
        cfg,
        override_model=tiny_model().to(cfg.device),
        override_dataset=tiny_token_dataset(),
        override_saes=saes,
    )


def _sweep_saes() -> dict[str, TrainingSAEConfig]:
    """Two lambdas with resampling, another width, and SAELens's standard SAE."""
    return {
        "gated_l1_0.5": _gated(l1_coefficient=0.5, **RESAMPLING),
        "gated_l1_20": _gated(l1_coefficient=20.0, **RESAMPLING),
        "gated_wide": _gated(d_sae=192, l1_coefficient=0.5, resample_dead=False),
        "standard": StandardTrainingSAEConfig(d_in=32, d_sae=128, l1_coefficient=1.0),
    }


@pytest.mark.usefixtures("offline_wandb")
@pytest.mark.parametrize("device", DEVICES)
def test_multi_runner_trains_gated_saes_beside_a_standard_one_with_prefixed_metrics(
    tmp_path: Path, wandb_log_calls: list[dict[str, Any]], device: str
):
    cfg = _multi_cfg(
        tmp_path,
        _sweep_saes(),
        device=device,
        lr=1e-2,
        training_tokens=64 * 60,
        n_checkpoints=1,
        logger={
            "log_to_wandb": True,
            "wandb_log_frequency": 5,
            "eval_every_n_wandb_logs": 4,
        },
    )
    saes = _runner(cfg).run()

    gated = {n: sae for n, sae in saes.items() if isinstance(sae, GatedTrainingSAE)}
    assert sorted(gated) == ["gated_l1_0.5", "gated_l1_20", "gated_wide"]
    assert type(saes["standard"]) is StandardTrainingSAE
    for name, sae in gated.items():
        assert max_norm_error(sae.W_dec) <= 1e-5, name
        assert sae.W_dec.device.type == device, name
    assert gated["gated_wide"].W_dec.shape == (192, 32)
    events = {
        name: sae.conventions.resampler.n_events
        for name, sae in gated.items()
        if sae.conventions.resampler is not None
    }
    assert events == {"gated_l1_0.5": 3, "gated_l1_20": 3}  # steps 20, 40 and 60
    assert gated["gated_l1_20"].conventions.resampler is not None
    assert gated["gated_l1_20"].conventions.resampler.n_resampled > 0

    history = history_of(wandb_log_calls)
    for name, sae in gated.items():
        for key in ("losses/l1_loss", "metrics/gate_l0"):
            values = history.get(f"{name}/{key}", [])
            assert len(values) == 12 and all(math.isfinite(v) for v in values), key
        assert len(history[f"{name}/weights/r_mag"]) == 3  # its own histograms
        resampler = sae.conventions.resampler
        if resampler is None:
            assert f"{name}/metrics/resampling/n_events" not in history
            continue
        assert history[f"{name}/metrics/resampling/n_events"][-1] == resampler.n_events
        assert (
            history[f"{name}/metrics/resampling/n_resampled"][-1]
            == resampler.n_resampled
        )
    # The two resampling SAEs resampled different numbers of features: no overwriting.
    assert (
        history["gated_l1_0.5/metrics/resampling/n_resampled"][-1]
        != history["gated_l1_20/metrics/resampling/n_resampled"][-1]
    )
    assert "standard/metrics/gate_l0" not in history
    assert len(history["standard/losses/overall_loss"]) == 12
    unprefixed = [k for k in history if k.split("/")[0] in ("metrics", "resampling")]
    assert unprefixed == []

    # One ordinary SAELens folder per SAE.
    for name, sae in gated.items():
        loaded = SAE.load_from_disk(Path(cfg.output_path or "") / name)
        assert type(loaded) is GatedSAE and loaded.cfg.d_sae == sae.cfg.d_sae
        x = torch.randn(20, 32)
        with torch.no_grad():
            on_device = sae(x.to(device)).cpu()
        torch.testing.assert_close(loaded(x), on_device, rtol=1e-5, atol=1e-5)

    # The mid-run checkpoint holds each resampling SAE's own resampler state.
    (checkpoint,) = Path(cfg.checkpoint_path or "").iterdir()
    assert checkpoint.name == str(64 * 31)  # past half of the 3840 tokens
    for name in ("gated_l1_0.5", "gated_l1_20"):
        state = load_file(checkpoint / name / RESAMPLER_STATE_FILENAME)
        assert int(state["completed_steps"]) == 31
        assert int(state["n_events"]) == 1
    assert not (checkpoint / "gated_wide" / RESAMPLER_STATE_FILENAME).exists()
    assert not (checkpoint / "standard" / RESAMPLER_STATE_FILENAME).exists()


def _record_lrs(
    saes: dict[str, TrainingSAE[Any]],
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[Any]]:
    """Per SAE: the LR each of its steps used, and the scheduled LR after the step."""
    during: dict[str, list[float]] = {name: [] for name in saes}
    scheduled: dict[str, list[float]] = {name: [] for name in saes}
    owner = {id(p): name for name, sae in saes.items() for p in sae.parameters()}

    def record(into: dict[str, list[float]]) -> Any:
        def hook(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            names = {
                owner.get(id(p)) for g in optimizer.param_groups for p in g["params"]
            }
            (name,) = names  # each SAE has its own optimizer
            if name is not None:
                into[name].append(optimizer.param_groups[0]["lr"])

        return hook

    handles = [
        register_optimizer_step_pre_hook(record(during)),
        register_optimizer_step_post_hook(record(scheduled)),
    ]
    return during, scheduled, handles


def test_a_resampling_event_rewarms_the_learning_rate_of_its_own_sae_only(
    tmp_path: Path,
):
    cfg = _multi_cfg(
        tmp_path,
        {
            "rewarm": _gated(
                l1_coefficient=20.0,
                **_one_event(30),
            ),
            "steady": _gated(l1_coefficient=20.0, resample_dead=False),
            "standard": StandardTrainingSAEConfig(
                d_in=32, d_sae=128, l1_coefficient=1.0
            ),
        },
        lr=1e-2,
        training_tokens=64 * 50,
        lr_scheduler_name="cosineannealing",
    )
    runner = _runner(cfg)
    during, scheduled, handles = _record_lrs(runner.saes)
    try:
        saes = runner.run()
    finally:
        for handle in handles:
            handle.remove()
    rewarm = saes["rewarm"]
    assert isinstance(rewarm, GatedTrainingSAE) and rewarm.conventions.resampler
    assert rewarm.conventions.resampler.n_resampled > 0
    # All three follow the same cosine schedule; only "rewarm" is lowered, for the 5
    # steps after its event at step 30, by the re-warm's cosine factor.
    assert scheduled["rewarm"] == scheduled["steady"] == scheduled["standard"]
    assert scheduled["steady"][40] < scheduled["steady"][0]
    ratios = [d / s for d, s in zip(during["rewarm"], scheduled["rewarm"])]
    for t in range(5):
        expected = 0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * t / 5))
        assert ratios[30 + t] == pytest.approx(expected, rel=1e-9), t
    assert ratios[:30] + ratios[35:] == [1.0] * 45
    assert during["steady"] == scheduled["steady"]
    assert during["standard"] == scheduled["standard"]


# ---- resume: SAELens's MultiSAETrainer (the runner's coordinator) on a fixed stream ------


class _Stream:
    """The same float64 multi-hook batches, in the same order, every time it is built."""

    def __init__(self, skip: int = 0) -> None:
        self.data = SparseSyntheticData(d_in=32, n_features=6, p_fire=0.1, seed=3)
        for _ in range(skip):
            next(self.data)

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return {HOOK: next(self.data).double()}


def _resume_saes(seed: int) -> dict[str, TrainingSAE[Any]]:
    torch.manual_seed(seed)
    resampling = _one_event(40)
    return {
        "low": GatedTrainingSAE(
            _gated(l1_coefficient=0.5, dtype="float64", **resampling)
        ),
        "high": GatedTrainingSAE(
            _gated(l1_coefficient=20.0, dtype="float64", **resampling)
        ),
        "standard": StandardTrainingSAE(
            StandardTrainingSAEConfig(
                d_in=32, d_sae=128, l1_coefficient=1.0, dtype="float64"
            )
        ),
    }


def _trainer_cfg(steps: int, batch: int, **overrides: Any) -> SAETrainerConfig:
    settings: dict[str, Any] = {
        "n_checkpoints": 0,
        "checkpoint_path": None,
        "save_final_checkpoint": False,
        "total_training_samples": steps * batch,
        "device": "cpu",
        "autocast": False,
        "lr": 1e-2,
        "lr_end": 1e-3,
        "lr_scheduler_name": "constant",
        "lr_warm_up_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "lr_decay_steps": 0,
        "n_restart_cycles": 1,
        "train_batch_size_samples": batch,
        "dead_feature_window": 10,
        "feature_sampling_window": 20,
        "logger": LoggingConfig(log_to_wandb=False),
        "n_batches_for_norm_estimate": 10,
    }
    settings.update(overrides)
    return SAETrainerConfig(**settings)


def test_multi_trainer_resumed_from_a_checkpoint_equals_an_uninterrupted_run(
    tmp_path: Path,
):
    steps, batch = 60, 128
    one_go = _resume_saes(seed=0)
    init = {name: sae.state_dict() for name, sae in one_go.items()}
    init = {n: {k: v.clone() for k, v in s.items()} for n, s in init.items()}
    hooks = dict.fromkeys(one_go, HOOK)
    # The uninterrupted run, which writes a checkpoint half way.
    MultiSAETrainer(
        _trainer_cfg(steps, batch, n_checkpoints=1, checkpoint_path=str(tmp_path)),
        one_go,
        hooks,
        _Stream(),
    ).fit()
    (mid,) = tmp_path.iterdir()
    mid_steps = int(mid.name) // batch
    assert 0 < mid_steps < 40  # the resampling event comes after the checkpoint
    for name in ("low", "high"):
        assert (mid / name / RESAMPLER_STATE_FILENAME).exists()

    resumed = _resume_saes(
        seed=1
    )  # other weights and generators: the checkpoint decides
    trainer = MultiSAETrainer(
        _trainer_cfg(steps, batch), resumed, hooks, _Stream(skip=mid_steps)
    )
    trainer.load_checkpoint(mid)
    trainer.fit()

    for name, sae in one_go.items():
        for key, value in sae.state_dict().items():
            assert not torch.equal(value, init[name][key]), (name, key)
            torch.testing.assert_close(
                resumed[name].state_dict()[key], value, atol=1e-10, rtol=0
            )
        if isinstance(sae, GatedTrainingSAE) and sae.conventions.resampler:
            resumed_sae = resumed[name]
            assert isinstance(resumed_sae, GatedTrainingSAE)
            assert resumed_sae.conventions.resampler is not None
            assert resumed_sae.conventions.resampler.n_events == 1
            assert (
                resumed_sae.conventions.resampler.n_resampled
                == sae.conventions.resampler.n_resampled
            )
    high = one_go["high"]
    assert isinstance(high, GatedTrainingSAE) and high.conventions.resampler
    assert high.conventions.resampler.n_resampled > 0  # the event had work to do


# ---- sparse_step="auto" ------------------------------------------------------------------


class _Clock:
    """A clock that moves only by the simulated cost of each SAE's training step."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@torch.no_grad()
def _open_one_percent_of_the_gates(sae: GatedTrainingSAE) -> None:
    """Set ``b_gate`` so that about 1% of the tiny model's activations open each gate."""
    tokens = torch.tensor(tiny_token_dataset()["tokens"][:64])
    _, cache = tiny_model().run_with_cache(tokens, names_filter=HOOK)
    acts = cache[HOOK].reshape(-1, 32).to(sae.W_enc.dtype)
    pre_gate = (acts - sae.b_dec) @ sae.W_enc
    sae.b_gate.copy_(-torch.quantile(pre_gate, 0.99, dim=0))


def _clocked(sae: GatedTrainingSAE, clock: _Clock, costs: dict[bool, float]) -> None:
    """Make each of ``sae``'s steps take ``costs[sparse]`` seconds on ``clock``."""
    policy = sae.conventions.sparse_policy
    policy.clock = clock
    policy.synchronize = lambda _device: None
    forward = sae.training_forward_pass

    def timed_forward(step_input: Any) -> Any:
        out = forward(step_input)
        clock.now += costs[out.feature_acts.is_sparse]  # between the policy's readings
        return out

    sae.training_forward_pass = timed_forward  # type: ignore[method-assign]


@pytest.mark.usefixtures("offline_wandb")
def test_sparse_step_auto_decides_for_each_sae_on_its_own_timings(
    tmp_path: Path, wandb_log_calls: list[dict[str, Any]]
):
    configs = {
        name: _gated(l1_coefficient=0.5, resample_dead=False, sparse_step="auto")
        for name in ("sparse_is_faster", "dense_is_faster")
    }
    saes: dict[str, GatedTrainingSAE] = {}
    clock = _Clock()
    for name, cfg in configs.items():
        sae = GatedTrainingSAE(cfg)
        _open_one_percent_of_the_gates(sae)
        sparse_cost = 1.0 if name == "sparse_is_faster" else 3.0
        _clocked(sae, clock, {True: sparse_cost, False: 2.0})
        saes[name] = sae
    cfg = _multi_cfg(
        tmp_path,
        dict[str, TrainingSAEConfig](configs),
        lr=1e-4,
        training_tokens=64 * 20,
        logger={"log_to_wandb": True, "wandb_log_frequency": 20},
    )
    _runner(cfg, dict[str, TrainingSAE[Any]](saes)).run()

    history = history_of(wandb_log_calls)
    for name, sparse in (("sparse_is_faster", 1.0), ("dense_is_faster", 0.0)):
        decision = saes[name].conventions.sparse_policy.decision
        assert decision is not None and decision.sparse == bool(sparse), name
        assert 0.0 < decision.density <= 0.03, name
        assert history[f"{name}/metrics/sparse_step_sparse"] == [sparse]
        dense_ms = 2000.0
        sparse_ms = 1000.0 if sparse else 3000.0
        assert history[f"{name}/metrics/sparse_step_dense_ms"] == [dense_ms]
        assert history[f"{name}/metrics/sparse_step_sparse_ms"] == [sparse_ms]
