import copy
from collections.abc import Callable

import pytest
import torch

import sae_lens_gated.training.fused_adam as fused_adam
from sae_lens_gated import GatedTrainingSAE
from sae_lens_gated.training.fused_adam import (
    FUSED_MARK,
    fuse_adam_groups,
    has_fused_kernel,
    unfuse_adam_groups,
)
from tests.helpers import (
    DEVICES,
    SparseSyntheticData,
    build_gated_training_cfg,
    float32_tolerance,
    make_trainer,
)


def _sae(fused: bool, device: str) -> GatedTrainingSAE:
    torch.manual_seed(0)
    cfg = build_gated_training_cfg(
        d_in=16, d_sae=48, fused_optimizer=fused, device=device
    )
    return GatedTrainingSAE(cfg)


def _fit(sae: GatedTrainingSAE, steps: int) -> list[bool]:
    """Train ``sae`` with SAELens's trainer; whether each of its param groups is fused."""
    trainer = make_trainer(sae, SparseSyntheticData(d_in=16, seed=4), steps=steps)
    trainer.fit()
    return [bool(group.get("fused")) for group in trainer.optimizer.param_groups]


@pytest.mark.parametrize("device", DEVICES)
def test_training_with_the_fused_kernel_takes_the_same_steps(device: str):
    # 40 steps of SAELens's trainer, with unit-norm decoder rows and gradient clipping:
    # the fused kernel computes the op-by-op Adam's update, to float32 rounding.
    start = _sae(True, device).state_dict()
    fused, op_by_op = _sae(True, device), _sae(False, device)
    assert _fit(fused, 40) == [True]
    assert _fit(op_by_op, 40) == [False]
    tol = float32_tolerance(device, 1e-5)
    for name, want in op_by_op.state_dict().items():
        assert not torch.equal(want, start[name]), name  # every parameter trained
        got = fused.state_dict()[name]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=name)


def _adam(*params: torch.nn.Parameter, **kwargs: object) -> torch.optim.Adam:
    return torch.optim.Adam(list(params), lr=1e-2, **kwargs)  # type: ignore[arg-type]


def _step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()


def test_only_groups_of_the_given_parameters_are_fused():
    own = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))]
    other = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([{"params": own[:1]}, {"params": [own[1], other]}])
    fuse_adam_groups(optimizer, {id(p) for p in own})
    assert optimizer.param_groups[0]["fused"] is True
    assert optimizer.param_groups[0]["foreach"] is False
    assert not optimizer.param_groups[1][
        "fused"
    ]  # also holds another model's parameter


def test_other_optimizers_and_differentiable_groups_are_left_as_built():
    params = [torch.nn.Parameter(torch.zeros(3))]
    ids = {id(p) for p in params}
    sgd = torch.optim.SGD(params, lr=0.1)
    fuse_adam_groups(sgd, ids)
    assert not sgd.param_groups[0].get("fused")

    class MyAdam(torch.optim.Adam):  # may step differently
        pass

    mine = MyAdam(params)
    fuse_adam_groups(mine, ids)
    assert not mine.param_groups[0]["fused"]
    differentiable = _adam(*params, differentiable=True)
    fuse_adam_groups(differentiable, ids)
    assert not differentiable.param_groups[0]["fused"]
    adamw = torch.optim.AdamW(params)
    fuse_adam_groups(adamw, ids)
    assert adamw.param_groups[0]["fused"] is True


def _six_adam_steps(
    device: str,
    fused_from_start: bool = False,
    after_three: Callable[[torch.optim.Adam, torch.nn.Parameter], None] | None = None,
) -> tuple[torch.Tensor, torch.optim.Adam]:
    """One parameter after six Adam steps on fixed random gradients from a fixed start,
    and its optimizer; ``after_three`` is called between the third and fourth step."""
    torch.manual_seed(0)
    start = torch.randn(5, 3, device=device)
    grads = [torch.randn(5, 3, device=device) for _ in range(6)]
    p = torch.nn.Parameter(start)
    optimizer = _adam(p)
    if fused_from_start:
        fuse_adam_groups(optimizer, {id(p)})
    for i, grad in enumerate(grads):
        if i == 3 and after_three is not None:
            after_three(optimizer, p)
        p.grad = grad
        optimizer.step()
    return p.detach(), optimizer


@pytest.mark.parametrize("device", DEVICES)
def test_a_group_stepped_op_by_op_goes_on_fused_from_its_state(device: str):
    # As on a resume from a checkpoint that SAELens's own optimizer wrote: the moments are
    # kept, the step counters move to the parameters' device (on CUDA: off the host).
    def switch(optimizer: torch.optim.Adam, p: torch.nn.Parameter) -> None:
        fuse_adam_groups(optimizer, {id(p)})
        step = optimizer.state[p]["step"]
        assert step.device == p.device and float(step) == 3

    want, op_by_op = _six_adam_steps(device)
    got, switched = _six_adam_steps(device, after_three=switch)
    assert not op_by_op.param_groups[0].get("fused")
    assert switched.param_groups[0]["fused"] is True
    tol = float32_tolerance(device, 1e-6)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_a_copied_optimizer_state_keeps_the_fused_setting():
    # SAELens checkpoints the optimizer's state dict: a resumed optimizer is fused too.
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = _adam(p)
    fuse_adam_groups(optimizer, {id(p)})
    _step(optimizer, [p])
    resumed = _adam(p)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed.param_groups[0]["fused"] is True
    assert resumed.param_groups[0][FUSED_MARK] is True  # so it can be undone
    _step(resumed, [p])
    assert float(resumed.state[p]["step"]) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_a_group_the_plugin_fused_goes_back_to_the_default_adam_from_its_state(
    device: str,
):
    # fused_optimizer=False on a resumed run whose checkpoint the plugin had fused: the
    # moments are kept, the step counters go back to the CPU, and the steps are the ones
    # the default Adam takes all along.
    def switch_back(optimizer: torch.optim.Adam, p: torch.nn.Parameter) -> None:
        unfuse_adam_groups(optimizer, {id(p)})
        group = optimizer.param_groups[0]
        assert not group["fused"] and group["foreach"] is None
        assert FUSED_MARK not in group
        step = optimizer.state[p]["step"]
        assert step.device.type == "cpu" and float(step) == 3

    want, _ = _six_adam_steps(device)
    got, _ = _six_adam_steps(device, fused_from_start=True, after_three=switch_back)
    tol = float32_tolerance(device, 1e-6)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_only_groups_the_plugin_fused_go_back():
    own = torch.nn.Parameter(torch.zeros(3))
    built_fused = _adam(own, fused=True)  # as whoever built it asked
    unfuse_adam_groups(built_fused, {id(own)})
    assert built_fused.param_groups[0]["fused"] is True
    other = torch.nn.Parameter(torch.zeros(2))
    shared = torch.optim.Adam([own, other])
    fuse_adam_groups(shared, {id(own), id(other)})
    unfuse_adam_groups(shared, {id(own)})  # the group also holds another model's
    assert shared.param_groups[0]["fused"] is True


def test_a_run_resumed_with_the_setting_off_steps_the_default_adam():
    # SAELens restores the checkpoint's param groups, the plugin's fused kernel included;
    # fused_optimizer=False on the resumed SAE gives the default Adam back.
    first = _sae(True, "cpu")
    trainer = make_trainer(first, SparseSyntheticData(d_in=16, seed=4), steps=5)
    trainer.fit()
    saved = copy.deepcopy(trainer.optimizer.state_dict())
    assert saved["param_groups"][0]["fused"] is True
    resumed = _sae(False, "cpu")
    resumed.load_state_dict(first.state_dict())
    again = make_trainer(resumed, SparseSyntheticData(d_in=16, seed=5), steps=5)
    again.optimizer.load_state_dict(saved)
    again.fit()
    group = again.optimizer.param_groups[0]
    assert not group["fused"] and FUSED_MARK not in group
    assert all(float(state["step"]) == 10 for state in again.optimizer.state.values())


def test_a_device_without_the_kernel_keeps_the_optimizer_as_built(
    monkeypatch: pytest.MonkeyPatch,
):
    # PyTorch before 2.4 has no fused Adam on the CPU: its constructor refuses it.
    assert has_fused_kernel("cpu") is True
    assert has_fused_kernel("no_such_device") is False
    monkeypatch.setattr(fused_adam, "has_fused_kernel", lambda _: False)
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = _adam(p)
    fuse_adam_groups(optimizer, {id(p)})
    assert not optimizer.param_groups[0]["fused"]
    _step(optimizer, [p])
    assert float(p.detach()[0]) < 0  # stepped op by op
