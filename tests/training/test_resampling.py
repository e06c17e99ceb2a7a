import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from sae_lens_gated import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.training import resampling
from sae_lens_gated.training.resampling import (
    SINGLE_PROCESS,
    DeadFeatureResampler,
    reinitialize_features,
    second_moment_horizon,
)
from tests.helpers import (
    DEVICES,
    SparseSyntheticData,
    build_gated_training_cfg,
    make_trainer,
    randomize_gated_params,
)


def _resampling_cfg(**kwargs: Any) -> GatedTrainingSAEConfig:
    settings: dict[str, Any] = {
        "d_in": 16,
        "d_sae": 128,
        "l1_coefficient": 3.0,
        "resample_every": 100,
        "resample_window": 50,
        "resample_pool_size": 1024,
        "resample_lr_warmup_steps": 20,
    }
    settings.update(kwargs)
    return build_gated_training_cfg(**settings)


class FiringRecorder:
    """Which features fired in each training forward pass (not in no-grad scoring)."""

    def __init__(self, sae: GatedTrainingSAE) -> None:
        self.steps: list[torch.Tensor] = []
        sae.hook_sae_acts_post.add_hook(self._record)  # type: ignore[arg-type]

    def _record(self, acts: torch.Tensor, hook: Any) -> None:  # noqa: ARG002
        if torch.is_grad_enabled():
            self.steps.append((acts > 0).any(dim=0).detach().clone())

    def dead_over(self, first: int, last: int) -> torch.Tensor:
        return ~torch.stack(self.steps[first:last]).any(dim=0)


def _dying_data(seed: int = 0) -> SparseSyntheticData:
    """Four true directions for a 128-feature SAE with a high lambda: many features die."""
    return SparseSyntheticData(d_in=16, n_features=4, p_fire=0.1, seed=seed)


def test_event_resamples_exactly_the_features_dead_in_the_window():
    sae = GatedTrainingSAE(_resampling_cfg())
    recorder = FiringRecorder(sae)
    make_trainer(sae, _dying_data(), steps=100).fit()
    assert sae.conventions.resampler is not None
    event = sae.conventions.resampler.last_event
    assert event is not None and event.step == 100
    expected = recorder.dead_over(50, 100).nonzero().flatten()
    assert expected.numel() >= 10  # the setting is built to kill features
    assert torch.equal(event.resampled.sort().values, expected)
    assert sae.conventions.resampler.n_events == 1
    assert sae.conventions.resampler.n_resampled == expected.numel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_resampled_feature_fires_in_the_steps_after_the_event(seed: int):
    torch.manual_seed(seed)  # the SAE's init and the resampler's seed
    sae = GatedTrainingSAE(_resampling_cfg(resample_steps=[100], resample_every=None))
    recorder = FiringRecorder(sae)
    make_trainer(sae, _dying_data(seed=1), steps=110).fit()
    assert sae.conventions.resampler is not None
    event = sae.conventions.resampler.last_event
    assert event is not None and event.step == 100
    # Dead through the window before the event, each of them fires within ten steps after.
    assert event.resampled.numel() >= 10
    assert recorder.dead_over(50, 100)[event.resampled].all()
    assert not recorder.dead_over(100, 110)[event.resampled].any()


def _crowded_run(resample: bool) -> FiringRecorder:
    """128 true directions in 16 dimensions for 256 features at a high lambda: features keep
    dying while there are still directions left to learn. The same init and data with and
    without resampling (events at steps 400 and 800)."""
    torch.manual_seed(0)
    cfg = _resampling_cfg(
        d_sae=256,
        l1_coefficient=2.0,
        resample_dead=resample,
        resample_steps=[400, 800] if resample else None,
        resample_every=None,
        resample_window=200,
        resample_pool_size=4096,
        resample_lr_warmup_steps=80,
        sparse_step="never",  # `auto`'s timed choices would make the runs drift apart
    )
    sae = GatedTrainingSAE(cfg)
    recorder = FiringRecorder(sae)
    data = SparseSyntheticData(d_in=16, n_features=128, p_fire=0.03, seed=100)
    make_trainer(sae, data, steps=1200, lr=1e-2).fit()
    return recorder


def test_resampling_leaves_fewer_dead_features_than_the_same_run_without():
    without, with_ = _crowded_run(resample=False), _crowded_run(resample=True)
    # Until the first event the runs are the same run: resampling's bookkeeping (firing
    # record, input pool) changes nothing in training.
    assert torch.equal(torch.stack(without.steps[:400]), torch.stack(with_.steps[:400]))
    assert without.dead_over(200, 400).sum() >= 20  # the first event has work to do
    # Features die all through these runs; with two events, at least 10% fewer are dead
    # over the last window (measured 113 against 148 for this seed, 0.76-0.87x on seeds 0-3).
    dead_without = int(without.dead_over(1000, 1200).sum())
    dead_with = int(with_.dead_over(1000, 1200).sum())
    assert dead_with <= 0.9 * dead_without, (dead_with, dead_without)


def _controlled_event(
    seed: int = 0, device: str = "cpu", pool_device: str | None = "cpu"
) -> dict[str, Any]:
    """Drive one event by hand: features 2, 5 and 7 never fire; 3 marked pool inputs
    carry all the reconstruction loss. Random inputs are drawn on the CPU and moved."""
    cfg = build_gated_training_cfg(
        d_in=8,
        d_sae=10,
        resample_every=5,
        resample_window=5,
        resample_pool_size=20,
        resample_pool_device=pool_device,
        device=device,
    )
    sae = GatedTrainingSAE(cfg)
    randomize_gated_params(sae, seed=seed, unit_decoder=True)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    for _ in range(3):  # give every parameter Adam state
        optimizer.zero_grad()
        sae.W_enc.sum().backward()
        for p in sae.parameters():
            if p.grad is None:
                p.grad = torch.randn_like(p)
        torch.optim.Adam.step(optimizer)  # type: ignore[arg-type]
    # The hooks above ran; reset the resampler's step count for a clean schedule.
    resampler = DeadFeatureResampler(cfg.resampling_schedule(), d_sae=10, seed=seed)
    sae.conventions.resampler = resampler
    marked = (torch.randn(3, 8) + 100.0).to(device)
    sae.per_example_reconstruction_error = lambda x: (x[:, 0] > 50).double() * x[:, 0]  # type: ignore[method-assign]
    dead = torch.tensor([2, 5, 7], device=device)
    for step in range(5):
        batch = torch.randn(4, 8).to(device)
        if step == 2:
            batch[1:] = marked
        acts = (torch.rand(4, 10) + 0.1).to(device)
        acts[:, dead] = 0
        resampler.observe(batch, acts)
        if step < 4:
            resampler.step_completed(sae, optimizer)
    params_before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    state_before = {
        n: {k: v.clone() for k, v in optimizer.state[p].items()}
        for n, p in sae.named_parameters()
    }
    alive_norm = sae.W_enc.detach().norm(dim=0)[[0, 1, 3, 4, 6, 8, 9]].mean()
    assert resampler.pool is not None
    pool = resampler.pool
    event = resampler.step_completed(sae, optimizer)
    return {
        "sae": sae,
        "optimizer": optimizer,
        "event": event,
        "marked": marked,
        "dead": dead,
        "params_before": params_before,
        "state_before": state_before,
        "alive_norm": alive_norm,
        "pool": pool,
    }


@pytest.mark.parametrize("device", DEVICES)
def test_resampled_rows_are_unit_directions_of_high_loss_centered_inputs(device: str):
    run = _controlled_event(device=device)
    sae, event, dead = run["sae"], run["event"], run["dead"]
    assert event is not None and torch.equal(event.resampled, dead)
    new_rows = sae.W_dec.detach()[dead]
    ones = torch.ones(3, device=device)
    torch.testing.assert_close(new_rows.norm(dim=1), ones, atol=1e-6, rtol=0)
    centered = run["marked"] - run["params_before"]["b_dec"]
    expected = centered / centered.norm(dim=1, keepdim=True)
    cos = new_rows @ expected.T  # each new row is one of the three marked inputs
    assert torch.equal(cos.argmax(dim=1).sort().values, torch.arange(3, device=device))
    torch.testing.assert_close(cos.max(dim=1).values, ones, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_resampled_encoder_columns_and_biases(device: str):
    run = _controlled_event(device=device)
    sae, dead = run["sae"], run["dead"]
    W_enc = sae.W_enc.detach()
    torch.testing.assert_close(
        W_enc[:, dead].norm(dim=0),
        torch.full((3,), 0.2 * float(run["alive_norm"]), device=device),
    )
    cos = torch.nn.functional.cosine_similarity(
        W_enc[:, dead].T, sae.W_dec.detach()[dead]
    )
    torch.testing.assert_close(cos, torch.ones(3, device=device))
    for name in ("b_gate", "b_mag", "r_mag"):
        zeros = torch.zeros(3, device=device)
        assert torch.equal(getattr(sae, name).detach()[dead], zeros)


@pytest.mark.parametrize("device", DEVICES)
def test_untouched_weights_and_optimizer_state_are_bit_identical(device: str):
    run = _controlled_event(device=device)
    sae, optimizer, dead = run["sae"], run["optimizer"], run["dead"]
    alive = torch.tensor(
        [i for i in range(10) if i not in dead.tolist()], device=device
    )
    slices = {
        "W_dec": lambda t, i: t[i],
        "W_enc": lambda t, i: t[:, i],
        "b_gate": lambda t, i: t[i],
        "b_mag": lambda t, i: t[i],
        "r_mag": lambda t, i: t[i],
    }
    for name, param in sae.named_parameters():
        before = run["params_before"][name]
        state_before = run["state_before"][name]
        if name not in slices:  # b_dec is not touched at all
            assert torch.equal(param.detach(), before)
            for key, value in optimizer.state[param].items():
                assert torch.equal(value, state_before[key])
            continue
        take = slices[name]
        assert torch.equal(take(param.detach(), alive), take(before, alive)), name
        for key in ("exp_avg", "exp_avg_sq"):
            value = optimizer.state[param][key]
            assert torch.equal(take(value, alive), take(state_before[key], alive)), name
            assert torch.equal(
                take(value, dead), torch.zeros_like(take(value, dead))
            ), name
            assert take(state_before[key], dead).abs().sum() > 0
        assert torch.equal(optimizer.state[param]["step"], state_before["step"])


@pytest.mark.parametrize("device", DEVICES)
def test_the_pool_is_kept_where_configured_with_the_same_event(device: str):
    torch.manual_seed(0)  # the same random inputs and gradients for both
    on_host = _controlled_event(device=device)  # the default: host memory
    torch.manual_seed(0)
    on_sae = _controlled_event(device=device, pool_device=None)
    assert on_host["pool"].device == torch.device("cpu")
    assert on_sae["pool"].device == on_host["sae"].W_dec.device
    assert torch.equal(on_host["pool"], on_sae["pool"].cpu())
    assert torch.equal(on_host["event"].resampled, on_sae["event"].resampled)
    for key, value in on_host["sae"].state_dict().items():
        assert torch.equal(value, on_sae["sae"].state_dict()[key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool_device", ["cpu", None])
def test_a_restored_pool_goes_back_where_configured(
    device: str, pool_device: str | None
):
    cfg = build_gated_training_cfg(
        resample_every=4,
        resample_window=4,
        resample_pool_size=16,
        resample_pool_device=pool_device,
    )
    saved = DeadFeatureResampler(cfg.resampling_schedule(), d_sae=48, seed=0)
    inputs = torch.randn(3, 16).to(device)
    # 4 steps to the event, 3 inputs per step: the pool of 16 takes this step's inputs.
    saved.observe(inputs, torch.ones(3, 48, device=device))
    restored = DeadFeatureResampler(cfg.resampling_schedule(), d_sae=48, seed=0)
    restored.load_state_dict(saved.state_dict(), device=device)
    expected = torch.device("cpu") if pool_device else inputs.device
    assert saved.pool is not None and restored.pool is not None
    assert saved.pool.device == restored.pool.device == expected
    assert torch.equal(restored.pool[:3], inputs.to(expected))


def test_the_pool_follows_its_setting_not_the_inputs():
    # The meta device holds no data, but shows even on a CPU-only machine that both
    # pooling and restoring put the pool on the configured device, not the inputs'.
    def resampler(pool_device: str | None) -> DeadFeatureResampler:
        cfg = build_gated_training_cfg(
            resample_every=4,
            resample_window=4,
            resample_pool_size=16,
            resample_pool_device=pool_device,
        )
        return DeadFeatureResampler(cfg.resampling_schedule(), d_sae=48, seed=0)

    pooling, saved = resampler("meta"), resampler(None)
    for each in (pooling, saved):
        each.observe(torch.randn(3, 16), torch.ones(3, 48))
    restored = resampler("meta")
    restored.load_state_dict(saved.state_dict(), device="cpu")
    assert pooling.pool is not None and restored.pool is not None
    assert pooling.pool.device.type == restored.pool.device.type == "meta"


def test_inputs_are_drawn_with_probability_proportional_to_squared_loss():
    sae = GatedTrainingSAE(build_gated_training_cfg(d_in=4, d_sae=6))
    resampler = DeadFeatureResampler(sae.cfg.resampling_schedule(), d_sae=6, seed=0)
    pool = torch.zeros(3, 4)
    pool[:, 0] = torch.tensor([0.0, 1.0, 2.0])  # losses 0, 1, 2 -> weights 0, 1, 4
    sae.per_example_reconstruction_error = lambda x: x[:, 0].double()  # type: ignore[method-assign]
    draws = resampler._sample_inputs(sae, pool, 3, 20_000)[:, 0]
    assert (draws == 0).sum() == 0
    frac_two = float((draws == 2).float().mean())
    assert frac_two == pytest.approx(0.8, abs=0.015)


def test_scoring_a_pool_of_several_chunks_shows_progress(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    bars: list[dict[str, Any]] = []

    def recording_tqdm(chunks: Any, **kwargs: Any) -> Any:
        bars.append(kwargs)
        return chunks

    monkeypatch.setattr(resampling, "tqdm", recording_tqdm)
    monkeypatch.setattr(resampling, "_LOSS_CHUNK", 2)
    sae = GatedTrainingSAE(build_gated_training_cfg(d_in=4, d_sae=6))
    resampler = DeadFeatureResampler(sae.cfg.resampling_schedule(), d_sae=6, seed=0)
    scored: list[int] = []

    def error(x: torch.Tensor) -> torch.Tensor:
        scored.append(x.shape[0])
        return x[:, 0].double() + 1

    sae.per_example_reconstruction_error = error  # type: ignore[method-assign]
    resampler._sample_inputs(sae, torch.randn(5, 4), 5, 2)
    assert scored == [2, 2, 1]
    (bar,) = bars
    assert bar["total"] == 3 and bar["disable"] is False and bar["leave"] is False
    assert "scoring the pooled inputs" in bar["desc"]
    # One chunk: no bar.
    resampler._sample_inputs(sae, torch.randn(2, 4), 2, 1)
    assert bars[-1]["total"] == 1 and bars[-1]["disable"] is True

    # The event's log line says how many inputs it chose among, and how long it took.
    monkeypatch.setattr(resampling, "_LOSS_CHUNK", 8192)
    with caplog.at_level(logging.INFO, logger="sae_lens_gated"):
        event = _controlled_event()["event"]
    assert event is not None and event.n_dead == 3
    assert re.search(
        r"Resampling event 1 at step 5: resampled 3 dead features, choosing among "
        r"20 pooled inputs \(\d+\.\d s\)\.",
        caplog.text,
    )


def test_a_rewarm_shorter_than_adams_second_moment_horizon_warns_once(
    caplog: pytest.LogCaptureFixture,
):
    # Re-warm of 20 steps, Adam's beta2 0.999 in SAELens's trainer: two events, one warning.
    sae = GatedTrainingSAE(_resampling_cfg())
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        make_trainer(sae, _dying_data(), steps=200).fit()
    assert sae.conventions.resampler is not None
    assert sae.conventions.resampler.n_events == 2
    assert sae.conventions.resampler.n_resampled > 0
    warnings = [r.getMessage() for r in caplog.records if "re-warm" in r.getMessage()]
    assert len(warnings) == 1
    assert "resample_lr_warmup_steps=20 is shorter" in warnings[0]
    assert "1 / (1 - beta2) = 1000 steps" in warnings[0]
    assert "up to 32x" in warnings[0]


def test_the_papers_rewarm_does_not_warn(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        event = _controlled_event()["event"]  # Adam beta2 0.999, re-warm 1000 steps
    assert event.resampled.numel() == 3
    assert "re-warm" not in caplog.text


def test_second_moment_horizon():
    params = [torch.nn.Parameter(torch.zeros(2))]
    horizon = second_moment_horizon(torch.optim.Adam(params, betas=(0.0, 0.999)))
    assert horizon == pytest.approx(1000.0)
    adam_w = torch.optim.AdamW(params, betas=(0.9, 0.9999))
    assert second_moment_horizon(adam_w) == pytest.approx(10000.0)
    assert second_moment_horizon(torch.optim.SGD(params, lr=0.1)) is None


def test_no_op_events_are_logged(caplog: pytest.LogCaptureFixture):
    cfg = build_gated_training_cfg(
        d_in=8, d_sae=4, resample_every=3, resample_window=3, resample_pool_size=8
    )
    sae = GatedTrainingSAE(cfg)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.0)
    resampler = DeadFeatureResampler(cfg.resampling_schedule(), d_sae=4, seed=0)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="sae_lens_gated"):
        for _ in range(3):  # everything fires: nothing dead
            resampler.observe(torch.randn(2, 8), torch.ones(2, 4))
            resampler.step_completed(sae, optimizer)
        for _ in range(3):  # nothing observed: no firing record, no pool
            resampler.step_completed(sae, optimizer)
    assert resampler.n_events == 2 and resampler.n_resampled == 0
    assert "no dead features, nothing to do" in caplog.text
    assert caplog.text.count("nothing to do") == 2
    for key, value in sae.state_dict().items():
        assert torch.equal(value, before[key])


def test_no_event_and_no_tracking_in_the_first_window():
    cfg = build_gated_training_cfg(
        d_in=8, d_sae=4, resample_every=10, resample_window=4, resample_pool_size=8
    )
    resampler = DeadFeatureResampler(cfg.resampling_schedule(), d_sae=4, seed=0)
    sae = GatedTrainingSAE(cfg)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.0)
    for step in range(6):
        resampler.observe(torch.randn(2, 8), torch.zeros(2, 4))
        assert resampler.fired_in_window is None, step  # window is steps 6..9
        assert resampler.step_completed(sae, optimizer) is None


def _record_lrs(sae: GatedTrainingSAE) -> tuple[list[float], list[float], Any]:
    during: list[float] = []
    scheduled: list[float] = []
    params = {id(p) for p in sae.parameters()}

    def pre(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if any(id(p) in params for g in optimizer.param_groups for p in g["params"]):
            during.append(optimizer.param_groups[0]["lr"])

    def post(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if any(id(p) in params for g in optimizer.param_groups for p in g["params"]):
            scheduled.append(optimizer.param_groups[0]["lr"])

    handles = [
        register_optimizer_step_pre_hook(pre),
        register_optimizer_step_post_hook(post),
    ]
    return during, scheduled, handles


@pytest.mark.parametrize("scheduler", ["constant", "cosineannealing"])
def test_learning_rate_rewarms_on_a_cosine_and_composes_with_the_scheduler(
    scheduler: str,
):
    sae = GatedTrainingSAE(_resampling_cfg(resample_lr_warmup_steps=20))
    during, scheduled, handles = _record_lrs(sae)
    try:
        make_trainer(
            sae,
            _dying_data(),
            steps=140,
            lr_scheduler_name=scheduler,
            lr_warm_up_steps=10,
        ).fit()
    finally:
        for handle in handles:
            handle.remove()
    assert (
        sae.conventions.resampler is not None
        and sae.conventions.resampler.n_resampled > 0
    )
    ratios = [d / s for d, s in zip(during, scheduled)]
    assert all(r == pytest.approx(1.0) for r in ratios[:100])
    for t in range(20):
        expected = 0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * t / 20))
        assert ratios[100 + t] == pytest.approx(expected, rel=1e-9), t
    assert all(r == pytest.approx(1.0) for r in ratios[120:])
    if scheduler == "cosineannealing":
        assert scheduled[130] < scheduled[20]  # SAELens's schedule kept decaying


def _exact_resume_cfg() -> GatedTrainingSAEConfig:
    return _resampling_cfg(
        resample_steps=[70], resample_every=None, resample_pool_size=512
    )


def test_checkpoint_and_resume_is_exact(tmp_path: Path):
    steps, batch = 100, 128

    torch.manual_seed(0)
    one_go = GatedTrainingSAE(_exact_resume_cfg())
    init = {k: v.clone() for k, v in one_go.state_dict().items()}
    assert one_go.conventions.resampler is not None
    init_generator = one_go.conventions.resampler.generator_state.clone()
    make_trainer(one_go, _dying_data(), steps).fit()

    torch.manual_seed(1)  # a different init, overwritten by the checkpoint
    first = GatedTrainingSAE(_exact_resume_cfg())
    first.load_state_dict(init)
    assert first.conventions.resampler is not None
    first.conventions.resampler.generator_state = init_generator
    data = _dying_data()
    # Stop at the checkpoint: SAELens saves one at the middle of training.
    trainer = make_trainer(
        first, data, steps, n_checkpoints=1, checkpoint_path=str(tmp_path)
    )
    trainer.fit()
    checkpoints = sorted(tmp_path.iterdir(), key=lambda p: int(p.name))
    mid = checkpoints[0]
    assert (mid / "gated_resampler_state.safetensors").exists()
    mid_steps = int(mid.name) // batch
    assert mid_steps < 70  # the event falls in the second half

    torch.manual_seed(2)
    resumed = GatedTrainingSAE(_exact_resume_cfg())
    resumed_data = _dying_data()
    for _ in range(mid_steps):
        next(resumed_data)
    resumed_trainer = make_trainer(resumed, resumed_data, steps)
    resumed_trainer.load_trainer_state(mid)
    resumed.load_weights_from_checkpoint(mid)
    resumed_trainer.fit()

    assert resumed.conventions.resampler is not None
    assert (
        resumed.conventions.resampler.n_events
        == one_go.conventions.resampler.n_events
        == 1
    )
    assert (
        resumed.conventions.resampler.n_resampled
        == one_go.conventions.resampler.n_resampled
        > 0
    )
    for name, value in one_go.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resample_window": -5}, "resample_window must be >= 1"),
        ({"resample_every": 0}, "resample_every must be >= 1"),
        (
            {"resample_every": 100, "resample_window": 500},
            "shorter than resample_window",
        ),
        (
            {"resample_steps": [100, 150], "resample_window": 80},
            "less than resample_window",
        ),
        ({"resample_steps": [50], "resample_window": 80}, "less than resample_window"),
        ({"resample_steps": [300, 200]}, "strictly increasing"),
        ({"resample_steps": []}, "non-empty"),
        ({"resample_steps": [300], "resample_every": 300}, "not both"),
        ({"resample_pool_size": 0}, "resample_pool_size must be >= 1"),
        (
            {"resample_encoder_scale": 0.0},
            "resample_encoder_scale must be > 0.0",
        ),
        ({"resample_lr_warmup_steps": -1}, "resample_lr_warmup_steps must be >= 0"),
        ({"resample_window": 30_000}, r"\[25000, 50000, 75000, 100000\]"),
    ],
)
def test_bad_resampling_configs_are_rejected(kwargs: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        build_gated_training_cfg(**kwargs)


def test_resampling_defaults_and_warnings(caplog: pytest.LogCaptureFixture):
    paper = build_gated_training_cfg()
    assert paper.resample_dead is True
    assert paper.resample_steps == [25_000, 50_000, 75_000, 100_000]
    assert (paper.resample_window, paper.resample_pool_size) == (12_500, 819_200)
    assert (paper.resample_encoder_scale, paper.resample_lr_warmup_steps) == (0.2, 1000)
    april = build_gated_training_cfg(recipe="april_update")
    assert april.resample_dead is False and april.resample_steps is None
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        build_gated_training_cfg(recipe="april_update", resample_dead=True)
    assert "resample_dead=True with unit_norm_decoder=False" in caplog.text


def test_pool_smaller_than_a_batch_warns_at_the_first_step(
    caplog: pytest.LogCaptureFixture,
):
    sae = GatedTrainingSAE(
        build_gated_training_cfg(
            resample_every=10, resample_window=10, resample_pool_size=64
        )
    )
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        make_trainer(sae, SparseSyntheticData(d_in=16), steps=2).fit()
    assert (
        "resample_pool_size=64 is smaller than one training batch (128 inputs)"
        in caplog.text
    )


def test_resampler_state_round_trips_and_rejects_bad_state():
    cfg = build_gated_training_cfg(
        resample_every=4, resample_window=4, resample_pool_size=8
    )
    resampler = DeadFeatureResampler(cfg.resampling_schedule(), d_sae=48, seed=3)
    sae = GatedTrainingSAE(cfg)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.0)
    for _ in range(2):
        resampler.observe(torch.randn(3, 16), torch.rand(3, 48))
        resampler.step_completed(sae, optimizer)
    state = resampler.state_dict()
    # The pool fills over the last steps before the event at step 4 (the second step's 3
    # rows): only the rows written are saved, never the buffer's uninitialized rest.
    assert int(state["pool_count"]) == 3
    assert resampler.pool is not None and resampler.pool.shape == (8, 16)
    assert torch.equal(state["pool"], resampler.pool[:3])
    copy = DeadFeatureResampler(cfg.resampling_schedule(), d_sae=48, seed=99)
    copy.load_state_dict(state, device="cpu")
    for key, value in copy.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert copy.pool is not None and copy.pool.shape == (8, 16)
    # Resumed, it goes on as the original does.
    batch, acts = torch.randn(3, 16), torch.rand(3, 48)
    for each in (resampler, copy):
        each.observe(batch, acts)
    assert torch.equal(copy.state_dict()["pool"], resampler.state_dict()["pool"])
    # A checkpoint holding the whole buffer (as saved before) still loads.
    copy.load_state_dict(
        dict(state, pool=torch.cat([state["pool"], torch.ones(5, 16)])), "cpu"
    )
    assert torch.equal(copy.state_dict()["pool"], state["pool"])
    with pytest.raises(ValueError, match="missing"):
        copy.load_state_dict({"n_events": torch.tensor(1)}, device="cpu")
    bad = dict(state, fired_in_window=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"fired_in_window of shape \(5,\)"):
        copy.load_state_dict(bad, device="cpu")
    bad = dict(state, pool=torch.zeros(5, 16))
    with pytest.raises(ValueError, match=r"pool of shape \(5, 16\), expected 3 rows"):
        copy.load_state_dict(bad, device="cpu")
    # A state without its pool (saved by a data-parallel process that keeps none).
    without_pool, whole = (
        resampler.state_dict(include_pool=False),
        resampler.state_dict(),
    )
    assert set(whole) - set(without_pool) == {"pool"}
    assert int(without_pool["pool_count"]) == 6
    with pytest.raises(ValueError, match="counts 6 pooled inputs but holds none"):
        copy.load_state_dict(without_pool, device="cpu")


class _HalfOfTwoProcesses:
    """Collectives of the second of two processes, each holding half of 8 features and
    of the rows; the other process's rows are ``batch + 100`` and its features never fire."""

    def global_rows(self, rows: int) -> int:
        return 2 * rows

    def keeps_pool(self) -> bool:
        return True

    def gather_rows(self, batch: torch.Tensor) -> torch.Tensor | None:
        return torch.cat([batch + 100, batch])

    def combine_fired(self, fired: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(fired), fired])

    def local_features(self, d_sae: int) -> slice:
        return slice(d_sae // 2, d_sae)

    def masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        del values, mask
        return torch.tensor(2.0)

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def pool_chunks(
        self, pool: torch.Tensor | None, rows: int, chunk_rows: int
    ) -> tuple[int, Iterator[torch.Tensor]]:
        return SINGLE_PROCESS.pool_chunks(pool, rows, chunk_rows)

    def gather_scores(self, scores: torch.Tensor, rows: int) -> torch.Tensor:
        return scores

    def take_rows(
        self, pool: torch.Tensor | None, chosen: torch.Tensor
    ) -> torch.Tensor:
        return SINGLE_PROCESS.take_rows(pool, chosen)


def test_resampler_state_covers_every_process_through_its_collectives():
    cfg = build_gated_training_cfg(
        d_in=4, d_sae=4, resample_every=3, resample_window=2, resample_pool_size=4
    )
    resampler = DeadFeatureResampler(
        cfg.resampling_schedule(), d_sae=8, seed=0, collectives=_HalfOfTwoProcesses()
    )
    for step in range(3):  # firing is tracked, and inputs pooled, in steps 2 and 3
        acts = torch.zeros(1, 4)
        acts[0, step] = 1.0
        resampler.observe(torch.full((1, 4), float(step)), acts)
        resampler.completed_steps += 1
    assert resampler.fired_in_window is not None
    assert resampler.fired_in_window.tolist() == [False] * 5 + [True, True, False]
    # 2 global rows per step: the other process's rows, then this one's.
    assert resampler.pool is not None
    assert resampler.pool[:, 0].tolist() == [101.0, 1.0, 102.0, 2.0]


def test_each_process_rewrites_only_its_own_features_with_the_global_mean_norm():
    sae = GatedTrainingSAE(build_gated_training_cfg(d_in=4, d_sae=4))
    randomize_gated_params(sae, seed=3, unit_decoder=True)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    directions = torch.eye(4)[:3]
    written = reinitialize_features(
        sae,
        torch.tensor([1, 5, 6]),  # feature 1 belongs to the other process
        directions,
        torch.tensor([True, False] * 4),
        0.5,
        _HalfOfTwoProcesses(),
    )
    local = torch.tensor([1, 2])  # global features 5 and 6
    assert torch.equal(written[0][1][0], local)
    torch.testing.assert_close(sae.W_dec.detach()[local], directions[1:])
    torch.testing.assert_close(
        sae.W_enc.detach()[:, local], directions[1:].T * 0.5 * 2.0
    )
    for name in ("W_dec", "b_gate", "b_mag", "r_mag"):
        for kept in (0, 3):
            assert torch.equal(getattr(sae, name).detach()[kept], before[name][kept])
    assert torch.equal(sae.W_enc.detach()[:, [0, 3]], before["W_enc"][:, [0, 3]])


@pytest.mark.parametrize("device", DEVICES)
def test_fired_features_of_sparse_and_dense_batches_agree(device: str):
    from sae_lens_gated.training.resampling import fired_features

    gen = torch.Generator().manual_seed(0)
    acts = torch.rand(30, 12, generator=gen) * (torch.rand(30, 12, generator=gen) < 0.1)
    acts[:, 3] = 0
    acts = acts.to(device)
    sparse = acts.to_sparse_coo()
    # An open gate whose feature is 0 is stored in a sparse step; it did not fire.
    with_zero = torch.sparse_coo_tensor(
        torch.cat([sparse.indices(), torch.tensor([[0], [3]], device=device)], dim=1),
        torch.cat([sparse.values(), torch.zeros(1, device=device)]),
        acts.shape,
    )
    expected = (acts > 0).any(dim=0)
    assert not expected[3] and expected.sum() > 6
    assert torch.equal(fired_features(acts), expected)
    assert torch.equal(fired_features(with_zero), expected)
