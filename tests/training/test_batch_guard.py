from typing import Any

import pytest
import torch

from sae_lens_gated import GatedTrainingSAE, NonFiniteBatchError
from sae_lens_gated.training.batch_guard import BatchGuard
from tests.helpers import SparseSyntheticData, build_gated_training_cfg, make_trainer


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


def test_non_finite_batch_in_sae_trainer_stops_before_any_update():
    sae = GatedTrainingSAE(build_gated_training_cfg())
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
    with pytest.raises(NonFiniteBatchError):
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


@pytest.mark.parametrize("recipe", ["paper", "april_update"])
def test_finite_batch_whose_loss_overflows_is_refused_before_any_update(recipe: str):
    sae = GatedTrainingSAE(build_gated_training_cfg(recipe=recipe))
    data = SparseSyntheticData(d_in=16)
    trainer = make_trainer(sae, data, steps=4)
    trainer.step(next(data))
    trainer.step(next(data))
    huge = next(data) * 1e30
    assert torch.isfinite(huge).all()
    _assert_step_refused(trainer, huge, "loss of this training batch is inf")
    trainer.step(next(data))  # training goes on with the next good batch
    assert all(torch.isfinite(v).all() for v in sae.state_dict().values())


def test_non_finite_gradients_are_refused_before_any_update():
    sae = GatedTrainingSAE(build_gated_training_cfg())
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
