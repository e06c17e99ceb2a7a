"""Settings and a one-process reference shared by the distributed tests.

All runs use float64 so that "equal to float tolerance" can be checked tightly: in
float32, Adam's nearly sign-only steps (beta1 = 0) turn the rounding differences of
summing the batch in two halves into 1e-3-sized weight differences within tens of steps.
"""

from collections.abc import Iterator
from typing import Any

import torch

from sae_lens_gated import GatedTrainingSAE
from tests.helpers import SparseSyntheticData, build_gated_training_cfg, make_trainer

BATCH = 64
STEPS = 60
EVENT = 40  # a resampling event inside the run
CHECKPOINT = EVENT - 2  # window open, pool half filled (2 of the 4 steps that fill it)
SETTINGS: dict[str, Any] = {
    "d_in": 16,
    "d_sae": 128,
    "l1_coefficient": 3.0,
    "resample_steps": [EVENT],
    "resample_window": 20,
    "resample_pool_size": 256,
    "resample_lr_warmup_steps": 10,
    "dtype": "float64",
}


class Rows(Iterator[torch.Tensor]):
    """Rows ``rows`` of every batch of ``source`` (after skipping ``skip`` batches)."""

    def __init__(
        self, source: Iterator[torch.Tensor], rows: slice, skip: int = 0
    ) -> None:
        self.source, self.rows = source, rows
        for _ in range(skip):
            next(source)

    def __next__(self) -> torch.Tensor:
        return next(self.source)[self.rows]


def global_batches(seed: int = 1) -> SparseSyntheticData:
    """The global batches every run trains on: four directions, many features die."""
    return SparseSyntheticData(
        d_in=16, n_features=4, p_fire=0.1, batch_size=BATCH, seed=seed
    )


def fresh_sae(**overrides: Any) -> GatedTrainingSAE:
    """The SAE every run starts from (same weights and resampler seed every time)."""
    torch.manual_seed(0)
    return GatedTrainingSAE(build_gated_training_cfg(**{**SETTINGS, **overrides}))


def trainer_for(
    sae: Any, data: Iterator[torch.Tensor], rows: int, steps: int = STEPS
) -> Any:
    return make_trainer(sae, data, steps, batch_size=rows)


def state_of(sae: Any) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in sae.state_dict().items()}


def reference_run(**overrides: Any) -> tuple[GatedTrainingSAE, float]:
    """One process, global batch: the run every distributed run must reproduce.

    Returns the trained SAE and the largest gradient norm seen before SAELens's clip (above
    1, clipping is active and the test of it can fail).
    """
    sae = fresh_sae(**overrides)
    norms: list[torch.Tensor] = []
    hooks = [
        p.register_post_accumulate_grad_hook(
            lambda p: norms.append(p.grad.detach().pow(2).sum())  # type: ignore[union-attr]
        )
        for p in sae.parameters()
        if p.requires_grad
    ]
    trainer_for(sae, global_batches(), BATCH).fit()
    for hook in hooks:
        hook.remove()
    n_params = len(hooks)
    per_step = torch.stack(norms).reshape(-1, n_params).sum(dim=1).sqrt()
    return sae, float(per_step.max())


def assert_states_close(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    atol: float = 1e-10,
) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, msg=name)


def pool_of(sae: Any) -> tuple[int, int | None]:
    """The resampler's count of pooled inputs, and the rows it keeps (None: no pool)."""
    resampler = sae.conventions.resampler
    pool = resampler.pool
    return resampler.pool_count, None if pool is None else pool.shape[0]
