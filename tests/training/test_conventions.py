import copy
from typing import Any

import pytest
import torch

from sae_lens_gated import GatedTrainingSAE, metrics
from sae_lens_gated.training import conventions, resampling
from sae_lens_gated.training.conventions import (
    listeners_of,
    remove_parallel_decoder_grad,
)
from tests.helpers import (
    DEVICES,
    SparseSyntheticData,
    build_gated_training_cfg,
    make_trainer,
    randomize_gated_params,
    step_input,
)


def _max_norm_error(sae: GatedTrainingSAE) -> float:
    return float((sae.W_dec.detach().norm(dim=1) - 1).abs().max())


def test_decoder_rows_stay_unit_norm_at_every_step_of_sae_trainer():
    sae = GatedTrainingSAE(build_gated_training_cfg(l1_coefficient=0.5))
    data = SparseSyntheticData(d_in=16)
    errors: list[float] = []
    data.on_next.append(lambda: errors.append(_max_norm_error(sae)))
    W_dec_before = sae.W_dec.detach().clone()
    make_trainer(sae, data, steps=60).fit()
    assert len(errors) == 60
    assert max(errors) <= 1e-5
    assert _max_norm_error(sae) <= 1e-5
    assert (sae.W_dec.detach() - W_dec_before).abs().max() > 1e-2


def test_without_the_constraint_norms_drift():
    sae = GatedTrainingSAE(build_gated_training_cfg(recipe="april_update"))
    make_trainer(sae, SparseSyntheticData(d_in=16), steps=60).fit()
    norms = sae.W_dec.detach().norm(dim=1)
    assert _max_norm_error(sae) > 0.1
    assert norms.std() > 1e-3  # rows started at exactly 0.1 and moved apart


def test_gradient_parallel_to_decoder_rows_is_removed_before_the_step():
    sae = GatedTrainingSAE(build_gated_training_cfg())
    randomize_gated_params(sae, seed=0, unit_decoder=True)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    seen: list[torch.Tensor] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            seen.append(sae.W_dec.grad.clone())  # type: ignore[union-attr]
            return super().step(closure)

    before = sae.W_dec.detach().clone()
    Recording([sae.W_dec], lr=0.1).step()
    radial = (seen[0] * before).sum(dim=1)
    assert radial.abs().max() <= 1e-6
    torch.testing.assert_close(
        sae.W_dec.detach(),
        (before - 0.1 * seen[0]) / (before - 0.1 * seen[0]).norm(dim=1, keepdim=True),
    )


def test_only_optimizers_holding_the_sae_parameters_trigger_its_hooks():
    sae = GatedTrainingSAE(build_gated_training_cfg())
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    other = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    assert sae.conventions not in listeners_of(optimizer)
    other(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((48,), 3.0))
    sae_optimizer = torch.optim.SGD([sae.b_gate], lr=0.1)
    assert sae.conventions in listeners_of(sae_optimizer)


def test_hooks_follow_parameters_replaced_by_assign_loading():
    sae = GatedTrainingSAE(build_gated_training_cfg())
    state = {k: v.clone() * 2 for k, v in sae.state_dict().items()}
    sae.load_state_dict(state, assign=True)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.0)
    assert sae.conventions in listeners_of(optimizer)
    optimizer.step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6, rtol=0)


def _resampling_cfg(**kwargs: Any) -> Any:
    return build_gated_training_cfg(
        d_in=16,
        d_sae=48,
        resample_every=10,
        resample_window=10,
        resample_pool_size=256,
        resample_lr_warmup_steps=6,
        clip_grad_norm=False,
        **kwargs,
    )


def _with_dead_features(sae: GatedTrainingSAE, n_dead: int = 6) -> GatedTrainingSAE:
    with torch.no_grad():
        sae.b_gate[:n_dead] = -1e3  # these gates never open: dead at every event
    return sae


@pytest.mark.parametrize("make_copy", ["deepcopy", "dill"])
def test_copied_and_unpickled_saes_train_with_their_conventions(make_copy: str):
    import dill  # type: ignore[import-untyped]

    original = _with_dead_features(GatedTrainingSAE(_resampling_cfg()))
    copy_of: dict[str, Any] = {
        "deepcopy": copy.deepcopy,
        "dill": lambda sae: dill.loads(dill.dumps(sae)),
    }
    clone = copy_of[make_copy](original)
    assert clone.conventions.sae is clone
    for sae in (original, clone):
        make_trainer(sae, SparseSyntheticData(d_in=16, seed=3), steps=30).fit()
    # Unit norm, resampling (3 events) and the unclipped gradient all applied to the
    # copy exactly as to the original: the two trained to the same weights.
    assert _max_norm_error(clone) <= 1e-5
    resampler = clone.conventions.resampler
    assert resampler is not None and resampler.n_events == 3
    assert resampler.n_resampled > 0
    for name, value in original.state_dict().items():
        torch.testing.assert_close(clone.state_dict()[name], value, rtol=0, atol=0)


def _train_sharing_one_optimizer(
    saes: list[GatedTrainingSAE], one_group: bool, steps: int = 30
) -> tuple[torch.optim.Optimizer, list[list[float]], list[list[float]]]:
    base_lr = 1e-3
    if one_group:
        groups: list[dict[str, Any]] = [
            {"params": [p for sae in saes for p in sae.parameters()]}
        ]
    else:
        groups = [{"params": list(sae.parameters())} for sae in saes]
    optimizer = torch.optim.Adam(groups, lr=base_lr, betas=(0.0, 0.999))
    used: list[list[float]] = []
    expected: list[list[float]] = []

    def record(opt: torch.optim.Optimizer, *_: Any) -> None:
        # Runs after the plugin's global pre-step hook, with the LR the step will use.
        used.append([g["lr"] for g in opt.param_groups])
        factors = [sae.conventions.lr_factor() for sae in saes]
        expected.append(
            [base_lr * min(factors)]
            if one_group
            else [base_lr * factor for factor in factors]
        )

    optimizer.register_step_pre_hook(record)
    data = SparseSyntheticData(d_in=16, seed=1)
    for _ in range(steps):
        x = next(data)
        loss = sum(sae.training_forward_pass(step_input(x)).loss for sae in saes)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
    return optimizer, used, expected


@pytest.mark.parametrize("one_group", [True, False])
@pytest.mark.parametrize("periods", [(10, 10), (10, 15)])
def test_lr_rewarm_of_saes_sharing_an_optimizer_uses_one_factor_per_group(
    one_group: bool, periods: tuple[int, int]
):
    saes = [
        _with_dead_features(
            GatedTrainingSAE(
                build_gated_training_cfg(
                    d_in=16,
                    d_sae=48,
                    resample_every=period,
                    resample_window=10,
                    resample_pool_size=256,
                    resample_lr_warmup_steps=6,
                )
            )
        )
        for period in periods
    ]
    optimizer, used, expected = _train_sharing_one_optimizer(saes, one_group)
    for sae in saes:
        assert sae.conventions.resampler is not None
        assert sae.conventions.resampler.n_resampled > 0
    for step, (got, want) in enumerate(zip(used, expected)):
        assert got == pytest.approx(want, rel=1e-12), step
    assert min(min(lrs) for lrs in used) == pytest.approx(1e-4)  # the 0.1x dip
    if not one_group and periods[0] != periods[1]:
        # Each SAE's re-warm stays in its own group.
        assert any(a != b for a, b in used)
    # The scheduled learning rate is back, for good, after every step.
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3] * len(used[0])


class _DoublingPlan:
    """A parallel plan whose gradient hook doubles each gradient, recording its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.handles: list[Any] = []

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        for handle in self.handles:
            handle.remove()
        self.calls.append(f"attach {len(params)}")
        self.handles = [
            p.register_post_accumulate_grad_hook(self._double)
            for p in params
            if p.requires_grad
        ]

    @staticmethod
    def _double(param: torch.Tensor) -> None:
        assert param.grad is not None
        param.grad.mul_(2)

    def before_step(self) -> None:
        self.calls.append("before_step")

    def after_step(self) -> None:
        self.calls.append("after_step")


def _gradients_at_the_step(
    sae: GatedTrainingSAE, x: torch.Tensor
) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    sae.training_forward_pass(step_input(x)).loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1e-3)  # SAELens's clip, smaller
    torch.optim.SGD(sae.parameters(), lr=0.0).step()
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def test_a_parallel_plan_hooks_gradients_first_and_runs_first_around_each_step():
    cfg = build_gated_training_cfg(recipe="april_update", clip_grad_norm=False)
    sae = GatedTrainingSAE(cfg)
    randomize_gated_params(sae, seed=0)
    x = torch.randn(32, 16)
    alone = _gradients_at_the_step(sae, x)

    plan = _DoublingPlan()
    sae.conventions.use_parallel(plan)
    assert plan.calls == ["attach 6"]
    # The clip undo records the gradient after the plan's hook: it restores the doubled
    # gradient (recorded first, it would restore the undoubled one).
    doubled = _gradients_at_the_step(sae, x)
    for name, grad in alone.items():
        torch.testing.assert_close(doubled[name], 2 * grad, msg=name)
    assert plan.calls == ["attach 6", "before_step", "after_step"]

    sae.conventions.use_parallel(None)
    assert plan.calls[-1] == "attach 0"  # its hooks are gone
    again = _gradients_at_the_step(sae, x)
    for name, grad in alone.items():
        torch.testing.assert_close(again[name], grad, msg=name)


@pytest.mark.parametrize(
    ("setting", "open_fraction", "expected"),
    [
        ("auto", 0.05, True),  # few gates open: a probe starts, warming sparse steps up
        ("auto", 0.5, False),
        ("always", 0.5, True),
        ("never", 0.05, False),
    ],
)
def test_the_next_step_follows_the_setting_and_auto_probes_once_few_gates_open(
    setting: str, open_fraction: float, expected: bool
):
    sae = GatedTrainingSAE(build_gated_training_cfg(sparse_step=setting))
    randomize_gated_params(sae, seed=0, unit_decoder=True)
    x = torch.randn(200, 16)
    with torch.no_grad():
        pre = sae.process_sae_in(x) @ sae.W_enc
        sae.b_gate.copy_(-torch.quantile(pre, 1 - open_fraction, dim=0))
    assert sae.conventions.sparse_step() is (setting == "always")  # first step
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.0)
    sae.training_forward_pass(step_input(x)).loss.backward()
    optimizer.step()  # the measured density is read before the step
    assert sae.conventions.sparse_step() is expected
    policy = sae.conventions.sparse_policy  # consulted under "auto" only
    if setting == "auto":
        assert policy.density == pytest.approx(open_fraction, rel=0.02)
    else:
        assert policy.density is None
    assert (policy.probe_position == 0) is (setting == "auto" and open_fraction < 0.1)


def test_parallel_decoder_gradient_is_removed_by_hand():
    W_dec = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    W_dec.grad = torch.tensor([[1.0, 0.0], [5.0, 7.0]])
    remove_parallel_decoder_grad(W_dec)
    # Row 0: 1*3/25 of (3, 4) removed; row 1: 14/4 of (0, 2) removed.
    expected = torch.tensor([[16 / 25, -12 / 25], [5.0, 0.0]])
    torch.testing.assert_close(W_dec.grad, expected)
    assert W_dec.grad_fn is None and not W_dec.grad.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_parallel_decoder_gradient_is_removed_row_by_row(device: str):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    grad = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    W_dec = torch.nn.Parameter(W.to(device))
    W_dec.grad = grad.to(device, copy=True)
    remove_parallel_decoder_grad(W_dec)
    tangent = W_dec.grad.cpu()
    # What is left is orthogonal to each row, and what was removed is along it.
    assert (tangent * W).sum(dim=1).abs().max() < 1e-12
    removed = grad - tangent
    cosine = (removed * W).sum(dim=1) / (removed.norm(dim=1) * W.norm(dim=1))
    torch.testing.assert_close(cosine.abs(), torch.ones(300, dtype=torch.float64))


def test_without_float64_the_metrics_and_resampling_scores_are_float32(
    monkeypatch: pytest.MonkeyPatch,
):
    # As on MPS, whose tensors cannot be float64: what the logging steps and the
    # resampling events compute in float64 elsewhere is float32 there.
    for module in (metrics, conventions, resampling):
        monkeypatch.setattr(module, "widest_float", lambda _device: torch.float32)
    drawn_from: list[torch.dtype] = []
    multinomial = torch.multinomial

    def spy(weights: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        drawn_from.append(weights.dtype)
        return multinomial(weights, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    torch.manual_seed(0)
    sae = _with_dead_features(GatedTrainingSAE(_resampling_cfg(l1_coefficient=1.0)))
    make_trainer(sae, SparseSyntheticData(d_in=16, seed=2), steps=12).fit()
    resampler = sae.conventions.resampler
    assert resampler is not None and resampler.n_events == 1
    assert resampler.n_resampled >= 6 and drawn_from == [torch.float32]

    logging_step = step_input(torch.randn(32, 16))
    logging_step.is_logging_step = True
    out = sae.training_forward_pass(logging_step)
    gamma, gate_l0 = out.metrics["relative_reconstruction_bias"], out.metrics["gate_l0"]
    assert isinstance(gamma, torch.Tensor) and isinstance(gate_l0, torch.Tensor)
    assert gamma.dtype is torch.float32 and gate_l0.dtype is torch.float32
    n_open = sae.encode_for_loss(logging_step.sae_in).gate_acts.gt(0).sum()
    assert float(gate_l0) == pytest.approx(float(n_open) / 32, rel=1e-6)
