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
