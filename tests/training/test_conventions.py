from typing import Any

import torch

from sae_lens_gated import GatedTrainingSAE
from sae_lens_gated.training.conventions import listeners_of
from tests.helpers import (
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
