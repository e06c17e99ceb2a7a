import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from sae_lens_gated import GatedTrainingSAE
from sae_lens_gated.saes.gated_function import SPARSE_STEP_MAX_DENSITY
from sae_lens_gated.training import sparse_policy
from sae_lens_gated.training.sparse_policy import (
    PROBE_STEPS,
    PROBE_TIMED_STEPS,
    REDECIDE_MIN_STEPS,
    SPARSE_POLICY_STATE_FILENAME,
    SparseStepPolicy,
    probe_modes,
)
from tests.helpers import (
    DEVICES,
    SparseSyntheticData,
    build_gated_training_cfg,
    make_trainer,
    step_input,
)

CPU = torch.device("cpu")
# A probe's modes (True: sparse) after a dense step: a sparse warm-up step, then dense and
# sparse timed steps, alternating.
PROBE = [True, False, True, False, True, False, True]


class FakeClock:
    """A clock that only moves when a step's work is simulated; counts synchronisations."""

    def __init__(self, device: str = "cpu") -> None:
        self.now = 100.0
        self.synced_at_steps: list[int] = []
        self.step = 0
        self.device = torch.device(device)

    def __call__(self) -> float:
        return self.now

    def synchronize(self, device: torch.device) -> None:
        assert device.type == self.device.type
        self.synced_at_steps.append(self.step)


def test_a_probe_warms_up_the_mode_the_previous_step_did_not_run():
    assert probe_modes(False) == tuple(PROBE)
    assert probe_modes(True) == tuple(not m for m in PROBE)


def _policy(clock: FakeClock) -> SparseStepPolicy:
    return SparseStepPolicy(clock=clock, synchronize=clock.synchronize)


def _drive(
    policy: SparseStepPolicy,
    clock: FakeClock,
    densities: list[float],
    seconds: Callable[[bool, int], float],
) -> list[bool]:
    """Run one simulated step per density; ``seconds(sparse, step)`` is what it takes."""
    modes: list[bool] = []
    for density in densities:
        sparse = policy.next_sparse()
        modes.append(sparse)
        policy.begin_step(CPU)
        clock.now += seconds(sparse, clock.step)
        policy.stop_clock()
        policy.end_step(density)
        clock.step += 1
    return modes


@torch.no_grad()
def _close_most_gates(sae: GatedTrainingSAE) -> None:
    """About 1% of the gates open from the start, and a third of the features never."""
    sae.b_gate.fill_(-1.0)[::3] = -20.0


class Step(NamedTuple):
    """One training step of an SAE on the fake clock."""

    sparse: bool
    probe_position: int | None  # its place in a probe
    density: float | None  # the previous step's open-gate fraction


def _costs(dense: float, sparse: float) -> Callable[[bool, int], float]:
    return lambda is_sparse, _step: sparse if is_sparse else dense


@pytest.mark.parametrize(
    ("dense_s", "sparse_s", "expected_sparse"),
    [
        (2.0, 1.0, True),  # sparse is faster
        (1.0, 2.0, False),  # dense is faster
        (1.0, 1.0, False),  # a tie goes to dense
        (1.0, 0.96, False),  # sparse faster by less than 5%: still dense
        (1.0, 0.94, True),  # by more than 5%
    ],
)
def test_the_faster_mode_is_chosen_and_a_tie_goes_to_dense(
    dense_s: float, sparse_s: float, expected_sparse: bool
):
    clock = FakeClock()
    policy = _policy(clock)
    modes = _drive(policy, clock, [0.01] * 20, _costs(dense_s, sparse_s))
    # The first step is dense; the second starts the probe: warm-up, then timed steps.
    assert modes[: 1 + PROBE_STEPS] == [False, *PROBE]
    assert modes[1 + PROBE_STEPS :] == [expected_sparse] * (19 - PROBE_STEPS)
    decision = policy.decision
    assert decision is not None and decision.sparse is expected_sparse
    assert decision.dense_ms == pytest.approx(1e3 * dense_s)
    assert decision.sparse_ms == pytest.approx(1e3 * sparse_s)
    assert decision.step == 1 + PROBE_STEPS and decision.density == 0.01


def test_the_median_of_the_timed_steps_decides_and_warm_up_steps_are_not_timed():
    clock = FakeClock()
    policy = _policy(clock)

    def seconds(sparse: bool, step: int) -> float:
        if step == 1:  # the sparse warm-up step: slow first calls, not counted
            return 50.0
        if step == 4:  # one of the three timed sparse steps, hit by a pause
            return 30.0
        return 0.5 if sparse else 1.0

    _drive(policy, clock, [0.02] * (1 + PROBE_STEPS), seconds)
    assert policy.decision is not None and policy.decision.sparse
    assert policy.decision.sparse_ms == pytest.approx(500.0)
    assert policy.decision.dense_ms == pytest.approx(1000.0)


def test_only_timed_probe_steps_synchronize_the_device():
    clock = FakeClock()
    policy = _policy(clock)
    _drive(policy, clock, [0.01] * 40, _costs(2.0, 1.0))
    timed = list(range(2, 1 + PROBE_STEPS))  # after step 0 and the warm-up step
    assert len(timed) == 2 * PROBE_TIMED_STEPS
    # Two synchronisations (before the forward, after the backward) per timed step only.
    assert clock.synced_at_steps == [step for step in timed for _ in range(2)]


def test_above_the_density_ceiling_steps_stay_dense_and_nothing_is_timed():
    clock = FakeClock()
    policy = _policy(clock)
    high = 2 * SPARSE_STEP_MAX_DENSITY
    modes = _drive(policy, clock, [high] * 30, _costs(9.0, 1.0))
    assert modes == [False] * 30 and policy.decision is None
    assert clock.synced_at_steps == []


def test_a_density_rising_above_the_ceiling_ends_a_probe_and_a_decision_for_sparse():
    clock = FakeClock()
    policy = _policy(clock)
    high = 2 * SPARSE_STEP_MAX_DENSITY
    # Step 0 makes step 1 eligible; steps 1-3 probe, step 3 opens too many gates.
    modes = _drive(policy, clock, [0.01, 0.01, 0.01, high, 0.01], _costs(2.0, 1.0))
    assert modes == [False, *PROBE[:3], False]  # the probe ended; no retry yet
    assert policy.probe_position is None and policy.decision is None

    clock2 = FakeClock()
    decided = _policy(clock2)
    _drive(decided, clock2, [0.01] * (1 + PROBE_STEPS), _costs(2.0, 1.0))
    assert decided.next_sparse()
    assert _drive(decided, clock2, [high, 0.01], _costs(2.0, 1.0)) == [True, False]
    assert decided.next_sparse()  # below the ceiling again, the decision holds


def test_a_probe_goes_on_while_the_density_wobbles_just_above_the_ceiling():
    clock = FakeClock()
    policy = _policy(clock)
    wobble = [0.099, 0.101, 0.104, 0.098, 0.1005, 0.097, 0.103, 0.099]
    modes = _drive(policy, clock, [0.099, *wobble, 0.101], _costs(2.0, 1.0))
    assert modes[: 1 + PROBE_STEPS] == [False, *PROBE]
    decision = policy.decision
    assert decision is not None and decision.sparse
    # After the decision the ceiling is strict: above it, dense.
    assert modes[-1] is True and policy.next_sparse() is False


def test_a_2x_density_move_brings_a_new_decision_after_the_minimum_interval():
    clock = FakeClock()
    policy = _policy(clock)
    n_first = 1 + PROBE_STEPS
    _drive(policy, clock, [0.01] * n_first, _costs(2.0, 1.0))
    first = policy.decision
    assert first is not None and first.sparse
    # 1.9x is no move; 2.1x is, but only REDECIDE_MIN_STEPS after the probe started.
    modes = _drive(policy, clock, [0.019] * 20 + [0.021] * 400, _costs(1.0, 2.0))
    probe_start = 1 + REDECIDE_MIN_STEPS  # the first probe started at step 1
    new = probe_start - n_first
    assert modes[:new] == [True] * new
    # After sparse steps, the probe warms the dense mode up first.
    assert modes[new : new + PROBE_STEPS] == [not m for m in PROBE]
    assert all(m is False for m in modes[new + PROBE_STEPS :])
    second = policy.decision
    assert second is not None and not second.sparse and second.density == 0.021
    assert second.step == probe_start + PROBE_STEPS


def test_a_resampling_request_brings_a_new_decision():
    clock = FakeClock()
    policy = _policy(clock)
    _drive(policy, clock, [0.01] * (1 + PROBE_STEPS), _costs(2.0, 1.0))
    policy.request_decision()
    modes = _drive(policy, clock, [0.01] * REDECIDE_MIN_STEPS, _costs(1.0, 2.0))
    new = 1 + REDECIDE_MIN_STEPS - (1 + PROBE_STEPS)
    assert modes[:new] == [True] * new
    assert modes[new : new + PROBE_STEPS] == [not m for m in PROBE]
    assert policy.decision is not None and not policy.decision.sparse


def test_each_decision_logs_one_info_line(caplog: pytest.LogCaptureFixture):
    clock = FakeClock()
    policy = _policy(clock)
    with caplog.at_level(logging.INFO, logger=sparse_policy.__name__):
        _drive(policy, clock, [0.004] * 30, _costs(0.25, 0.125))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "sparse_step=auto at step 8: dense 250.00 ms, sparse 125.00 ms (medians of 3) "
        "at 0.4% open gates: sparse steps"
    ]
    assert policy.metrics() == {
        "sparse_step_sparse": 1.0,
        "sparse_step_dense_ms": 250.0,
        "sparse_step_sparse_ms": 125.0,
    }


@pytest.mark.parametrize("stop_after", [3, 6, 1 + PROBE_STEPS + 5])
def test_a_restored_state_makes_the_same_choices(tmp_path: Path, stop_after: int):
    densities = [0.01] * 30 + [0.05] * 400

    def seconds(sparse: bool, step: int) -> float:
        return (1.0 if sparse else 2.0) if step < 100 else (3.0 if sparse else 2.0)

    clock = FakeClock()
    whole = _policy(clock)
    uninterrupted = _drive(whole, clock, densities, seconds)

    clock = FakeClock()
    first = _policy(clock)
    modes = _drive(first, clock, densities[:stop_after], seconds)
    first.save(tmp_path)
    resumed = _policy(clock)
    resumed.load(tmp_path)
    modes += _drive(resumed, clock, densities[stop_after:], seconds)
    assert modes == uninterrupted
    assert resumed.state_dict() == whole.state_dict()
    assert whole.decision is not None and not whole.decision.sparse  # decided twice


def test_an_unreadable_state_file_is_one_clear_error(tmp_path: Path):
    (tmp_path / SPARSE_POLICY_STATE_FILENAME).write_text('{"steps": 3}')
    with pytest.raises(ValueError, match=SPARSE_POLICY_STATE_FILENAME):
        SparseStepPolicy().load(tmp_path)
    (tmp_path / SPARSE_POLICY_STATE_FILENAME).write_text("not json")
    with pytest.raises(ValueError, match="Could not read"):
        SparseStepPolicy().load(tmp_path)


# ---- through a GatedTrainingSAE and SAELens's trainer --------------------------------------


def _clocked_sae(
    clock: FakeClock, costs: dict[bool, float], steps: list[Step], **cfg: Any
) -> GatedTrainingSAE:
    """A float64 auto SAE on ``clock`` whose steps take ``costs[sparse]`` seconds; each
    training step is recorded in ``steps``."""
    sae = GatedTrainingSAE(
        build_gated_training_cfg(
            dtype="float64", l1_coefficient=10.0, device=str(clock.device), **cfg
        )
    )
    _close_most_gates(sae)
    policy = sae.conventions.sparse_policy
    policy.clock = clock
    policy.synchronize = clock.synchronize
    forward = sae.training_forward_pass

    def timed_forward(step_input: Any) -> Any:
        position, density = policy.probe_position, policy.density
        clock.step = len(steps)
        out = forward(step_input)
        sparse = out.feature_acts.is_sparse
        steps.append(Step(sparse, position, density))
        clock.now += costs[sparse]  # between the policy's two clock readings
        return out

    sae.training_forward_pass = timed_forward  # type: ignore[method-assign]
    return sae


def _data() -> Any:
    return (batch.double() for batch in SparseSyntheticData(d_in=16, seed=4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_faster", [True, False])
def test_auto_trains_the_same_sae_as_steps_forced_into_the_modes_it_chose(
    sparse_faster: bool, device: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(sparse_policy, "REDECIDE_MIN_STEPS", 10)
    costs = {True: 1.0, False: 2.0} if sparse_faster else {True: 2.0, False: 1.0}
    clock = FakeClock(device)
    steps: list[Step] = []
    resampling = {"resample_every": 40, "resample_window": 40}
    torch.manual_seed(0)
    auto = _clocked_sae(clock, costs, steps, resample_pool_size=512, **resampling)
    make_trainer(auto, _data(), steps=100, lr=1e-2).fit()
    resampler = auto.conventions.resampler
    assert resampler is not None and resampler.n_events == 2
    assert resampler.n_resampled >= 16  # the features that never open, at least

    # A probe after the first step, and one soon after each resampling event.
    probes = [i for i, step in enumerate(steps) if step.probe_position == 0]
    assert probes[0] == 1
    assert any(41 <= p <= 50 for p in probes) and any(81 <= p <= 90 for p in probes)
    first = True
    for i, step in enumerate(steps):
        if step.probe_position == 0:  # warms up the mode the previous step did not run
            first = not steps[i - 1].sparse
        if step.probe_position is not None:
            assert step.sparse is (first if step.probe_position % 2 == 0 else not first)
        elif i > 0:  # the decision, where the previous step opened few enough gates
            assert step.density is not None
            below_ceiling = step.density <= SPARSE_STEP_MAX_DENSITY
            assert step.sparse is (sparse_faster and below_ceiling), i
    assert any(not s.density or s.density > SPARSE_STEP_MAX_DENSITY for s in steps[41:])
    # Synchronised on the timed steps of the probes only, twice each.
    timed = [i for i, step in enumerate(steps) if (step.probe_position or 0) >= 1]
    assert clock.synced_at_steps == [i for i in timed for _ in range(2)]

    torch.manual_seed(0)
    forced = GatedTrainingSAE(
        build_gated_training_cfg(
            dtype="float64",
            l1_coefficient=10.0,
            resample_pool_size=512,
            device=device,
            **resampling,
        )
    )
    _close_most_gates(forced)
    forward = forced.training_forward_pass
    schedule = iter([step.sparse for step in steps])

    def forced_step(step_input: Any) -> Any:
        forced.cfg.sparse_step = "always" if next(schedule) else "never"
        return forward(step_input)

    forced.training_forward_pass = forced_step  # type: ignore[method-assign]
    make_trainer(forced, _data(), steps=100, lr=1e-2).fit()
    for name, value in forced.state_dict().items():
        torch.testing.assert_close(auto.state_dict()[name], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_restores_the_decision_through_sae_checkpoints(
    tmp_path: Path, device: str
):
    steps, costs = 12, {True: 1.0, False: 2.0}
    clock = FakeClock(device)
    steps_seen: list[Step] = []
    torch.manual_seed(0)
    whole = _clocked_sae(clock, costs, steps_seen)
    # SAELens saves one checkpoint in the middle of the run, which goes on to the end.
    trainer = make_trainer(
        whole, _data(), steps, n_checkpoints=1, checkpoint_path=str(tmp_path)
    )
    trainer.fit()
    (mid,) = tmp_path.iterdir()
    mid_steps = int(mid.name) // 128
    assert (mid / SPARSE_POLICY_STATE_FILENAME).exists()

    resumed_steps: list[Step] = []
    torch.manual_seed(1)  # a different init, overwritten by the checkpoint
    resumed = _clocked_sae(FakeClock(device), costs, resumed_steps)
    data = _data()
    for _ in range(mid_steps):
        next(data)
    trainer = make_trainer(resumed, data, steps)
    trainer.load_trainer_state(mid)
    resumed.load_weights_from_checkpoint(mid)
    trainer.fit()
    # The checkpoint fell inside the run's probe; the resumed run finishes that probe
    # and decides as the uninterrupted run did.
    assert steps_seen[mid_steps].probe_position not in (None, 0)
    assert resumed_steps == steps_seen[mid_steps:]
    policy = resumed.conventions.sparse_policy
    assert policy.state_dict() == whole.conventions.sparse_policy.state_dict()
    assert policy.decision is not None and policy.decision.sparse
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(
            resumed.state_dict()[name], value, rtol=0, atol=1e-12
        )


def test_logging_steps_report_the_decision_beside_the_gated_metrics():
    clock = FakeClock()
    steps: list[Step] = []
    sae = _clocked_sae(clock, {True: 0.004, False: 0.010}, steps)
    trainer = make_trainer(sae, _data(), steps=20)
    trainer.fit()
    logging_step = step_input(next(_data()), l1=3.0)
    logging_step.is_logging_step = True
    out = sae.training_forward_pass(logging_step)
    assert out.metrics["sparse_step_sparse"] == 1.0
    assert out.metrics["sparse_step_dense_ms"] == pytest.approx(10.0)
    assert out.metrics["sparse_step_sparse_ms"] == pytest.approx(4.0)
    assert "gate_l0" in out.metrics


# ---- devices whose PyTorch backend lacks the sparse step's ops -----------------------------

# What PyTorch says where a backend has no kernel for an op (here MPS, which has no sparse
# CSR tensors).
MISSING_OP = (
    "Could not run 'aten::sparse_sampled_addmm' with arguments from the 'SparseCsrMPS' "
    "backend."
)


@pytest.fixture
def fresh_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """sparse_step_problem asks anew: no answer remembered from other tests."""
    monkeypatch.setattr(sparse_policy, "_SPARSE_PROBLEMS", {})


@pytest.fixture
def no_sampled_addmm(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``torch.sparse.sampled_addmm`` raises as on such a backend; counts its calls.
    sparse_step_problem asks anew."""
    monkeypatch.setattr(sparse_policy, "_SPARSE_PROBLEMS", {})
    calls: list[int] = []

    def missing(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        calls.append(1)
        raise NotImplementedError(f"{MISSING_OP}\n\nThe backends it has: CPU, CUDA.")

    monkeypatch.setattr(torch.sparse, "sampled_addmm", missing)
    return calls


@pytest.mark.usefixtures("fresh_answers")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
def test_the_sparse_step_has_no_problem_where_its_ops_exist(
    device: str, autocast: bool
):
    rng = torch.get_rng_state()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        problem = sparse_policy.sparse_step_problem(
            torch.device(device), torch.float32, torch.float32
        )
    assert problem is None
    # The tiny step draws from a generator of its own, not from training's random stream.
    assert torch.equal(torch.get_rng_state(), rng)
    work = torch.bfloat16 if autocast else torch.float32
    expected = {(device, torch.float32, torch.float32, work): None}
    assert expected == sparse_policy._SPARSE_PROBLEMS


def test_the_sparse_step_problem_names_the_missing_op_and_is_asked_once(
    no_sampled_addmm: list[int],
):
    problem = sparse_policy.sparse_step_problem(CPU, torch.float64, torch.float64)
    assert problem == f"NotImplementedError: {MISSING_OP}"
    assert (
        sparse_policy.sparse_step_problem(CPU, torch.float64, torch.float64) == problem
    )
    assert no_sampled_addmm == [1]


def test_auto_keeps_every_step_dense_where_the_sparse_ops_are_missing(
    no_sampled_addmm: list[int],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(sparse_policy, "REDECIDE_MIN_STEPS", 10)
    clock = FakeClock()
    steps: list[Step] = []
    torch.manual_seed(0)
    # Sparse steps would be faster: where they run, auto chooses them from the first probe.
    auto = _clocked_sae(clock, {True: 1.0, False: 2.0}, steps)
    with caplog.at_level(logging.WARNING, logger=sparse_policy.__name__):
        make_trainer(auto, _data(), steps=40, lr=1e-2).fit()
    # The probe that would have started at step 1 with a sparse warm-up step ended there.
    assert [step.probe_position for step in steps[:3]] == [None, 0, None]
    assert not any(step.sparse for step in steps)
    assert all(step.probe_position is None for step in steps[2:])
    assert clock.synced_at_steps == []  # nothing timed
    policy = auto.conventions.sparse_policy
    assert policy.decision is None
    assert policy.sparse_ruled_out is not None and MISSING_OP in policy.sparse_ruled_out
    assert no_sampled_addmm == [1]  # tried once, by the tiny step, never in training
    (warning,) = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ]
    assert warning.startswith(
        "sparse_step=auto keeps every step dense: the sparse step's"
    )
    assert "fail on cpu" in warning and MISSING_OP in warning

    # The very SAE that dense steps alone train.
    torch.manual_seed(0)
    never = GatedTrainingSAE(
        build_gated_training_cfg(
            dtype="float64", l1_coefficient=10.0, sparse_step="never"
        )
    )
    _close_most_gates(never)
    make_trainer(never, _data(), steps=40, lr=1e-2).fit()
    for name, value in never.state_dict().items():
        torch.testing.assert_close(auto.state_dict()[name], value, rtol=0, atol=0)


def test_always_is_refused_at_the_first_step_where_the_sparse_ops_are_missing(
    no_sampled_addmm: list[int],
):
    torch.manual_seed(0)
    sae = GatedTrainingSAE(
        build_gated_training_cfg(dtype="float64", sparse_step="always")
    )
    before = {name: value.clone() for name, value in sae.state_dict().items()}
    message = (
        r"^sparse_step='always' cannot train here: the sparse step's ops fail on cpu "
        r"\(NotImplementedError: Could not run 'aten::sparse_sampled_addmm' .*\)\. "
        r"Use sparse_step='auto' \(dense steps where sparse ones cannot run\) or 'never'\.$"
    )
    with pytest.raises(ValueError, match=message):
        make_trainer(sae, _data(), steps=5).fit()
    assert no_sampled_addmm == [1]
    for name, value in before.items():
        assert torch.equal(sae.state_dict()[name], value), name
