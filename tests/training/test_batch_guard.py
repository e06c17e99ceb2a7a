from typing import Any

import pytest
import torch

from sae_lens_gated import GatedTrainingSAE, NonFiniteBatchError
from sae_lens_gated.training.batch_guard import BatchGuard
from tests.helpers import (
    DEVICES,
    SparseSyntheticData,
    build_gated_training_cfg,
    make_trainer,
)

# On CUDA the batch and loss flags are read just before the optimizer step, without the
# details the CPU's immediate check gives.
_STOPPED = "contained NaN or inf values; the optimizer step was stopped"


def test_cpu_batches_are_checked_immediately_with_counts():
    guard = BatchGuard()
    guard.check_batch(torch.randn(4, 3))
    x = torch.randn(4, 3)
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), float("nan")
    with pytest.raises(
        NonFiniteBatchError, match=r"shape \(4, 3\) contains 2 NaN and 1 inf"
    ):
        guard.check_batch(x)
    guard.raise_if_bad()  # nothing deferred on the CPU


@pytest.mark.parametrize("device", DEVICES)
def test_the_flags_are_read_before_the_optimizer_step_at_the_latest(device: str):
    guard = BatchGuard()
    bad = torch.randn(4, 3, device=device)
    bad[0, 0] = float("nan")
    if device == "cpu":  # checked at once, with counts
        with pytest.raises(NonFiniteBatchError, match=r"contains 1 NaN and 0 inf"):
            guard.check_batch(bad)
    else:  # recorded without waiting for the device
        guard.check_batch(bad)
        guard.check_loss(torch.tensor(float("inf"), device=device))
        with pytest.raises(NonFiniteBatchError, match=_STOPPED):
            guard.raise_if_bad()
    guard.check_batch(torch.randn(4, 3, device=device))
    guard.check_loss(torch.tensor(1.0, device=device))
    guard.raise_if_bad()  # the refused step's flags are not read again


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_batch_in_sae_trainer_stops_before_any_update(device: str):
    sae = GatedTrainingSAE(build_gated_training_cfg(device=device))
    data = SparseSyntheticData(d_in=16)
    batches = iter([next(data), next(data), next(data) * float("nan"), next(data)])
    trainer = make_trainer(sae, batches, steps=4)
    trainer.step(next(batches))
    trainer.step(next(batches))
    weights = {k: v.clone() for k, v in sae.state_dict().items()}
    adam_state = {
        id(p): {k: v.clone() for k, v in s.items()}
        for p, s in trainer.optimizer.state.items()
    }
    match = "contains 2048 NaN" if device == "cpu" else _STOPPED
    with pytest.raises(NonFiniteBatchError, match=match):
        trainer.step(next(batches))
    for name, value in sae.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for p, s in trainer.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, adam_state[id(p)][k])


def _assert_step_refused(trainer: Any, batch: torch.Tensor, match: str) -> None:
    sae = trainer.sae
    weights = {k: v.clone() for k, v in sae.state_dict().items()}
    adam_state = {
        id(p): {k: v.clone() for k, v in s.items()}
        for p, s in trainer.optimizer.state.items()
    }
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    with pytest.raises(NonFiniteBatchError, match=match):
        trainer.step(batch)
    for name, value in sae.state_dict().items():
        assert torch.equal(value, weights[name]), name
        assert torch.isfinite(value).all(), name
    for p, s in trainer.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, adam_state[id(p)][k])
    assert [g["lr"] for g in trainer.optimizer.param_groups] == lrs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["paper", "april_update"])
def test_finite_batch_whose_loss_overflows_is_refused_before_any_update(
    recipe: str, device: str
):
    sae = GatedTrainingSAE(build_gated_training_cfg(recipe=recipe, device=device))
    data = SparseSyntheticData(d_in=16)
    trainer = make_trainer(sae, data, steps=4)
    trainer.step(next(data))
    trainer.step(next(data))
    huge = next(data) * 1e30
    assert torch.isfinite(huge).all()
    match = "loss of this training batch is inf" if device == "cpu" else _STOPPED
    _assert_step_refused(trainer, huge, match)
    trainer.step(next(data))  # training goes on with the next good batch
    assert all(torch.isfinite(v).all() for v in sae.state_dict().values())


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_gradients_are_refused_before_any_update(device: str):
    sae = GatedTrainingSAE(build_gated_training_cfg(device=device))
    data = SparseSyntheticData(d_in=16)
    trainer = make_trainer(sae, data, steps=4)
    trainer.step(next(data))
    # A gradient that turns non-finite after the loss (e.g. an overflow in backward).
    handle = sae.b_mag.register_hook(lambda g: g * float("inf"))
    _assert_step_refused(trainer, next(data), "gradients of b_mag are not finite")
    handle.remove()


def test_an_empty_batch_is_a_clear_error():
    sae = GatedTrainingSAE(build_gated_training_cfg())
    trainer = make_trainer(sae, SparseSyntheticData(d_in=16), steps=2)
    with pytest.raises(ValueError, match=r"Empty training batch of shape \(0, 16\)"):
        trainer.step(torch.empty(0, 16))
