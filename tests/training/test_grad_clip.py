from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sae_lens_gated import GatedTrainingSAE
from sae_lens_gated.training.grad_clip import GradientClipUndo
from tests.helpers import SparseSyntheticData, build_gated_training_cfg, make_trainer


def test_saelens_clipping_is_kept_by_default():
    assert build_gated_training_cfg().clip_grad_norm is True
    assert build_gated_training_cfg(recipe="april_update").clip_grad_norm is True


def test_clip_restore_gives_the_optimizer_the_unclipped_gradient():
    torch.manual_seed(0)
    results: dict[bool, float] = {}
    for clip in (False, True):
        sae = GatedTrainingSAE(
            build_gated_training_cfg(clip_grad_norm=clip, resample_dead=False)
        )
        norms: list[float] = []
        params = list(sae.parameters())

        def pre(*_: Any) -> None:
            grads = [p.grad for p in params if p.grad is not None]
            norms.append(
                float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            )

        handle = register_optimizer_step_pre_hook(pre)
        data = SparseSyntheticData(d_in=16)
        big = iter([next(data) * 50 for _ in range(3)])
        try:
            make_trainer(sae, big, steps=3).fit()
        finally:
            handle.remove()
        results[clip] = max(norms)
    assert results[True] <= 1.0 + 1e-5
    assert results[False] > 10.0


def test_clip_undo_restores_exactly_what_clipping_removed():
    layer = torch.nn.Linear(8, 8)
    undo = GradientClipUndo()
    undo.attach(layer.parameters())
    (layer(torch.randn(4, 8) * 100).pow(2).sum()).backward()
    raw = [p.grad.clone() for p in layer.parameters()]  # type: ignore[union-attr]
    torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
    undo.restore(list(layer.parameters()))
    for p, g in zip(layer.parameters(), raw):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=0)


def test_restore_is_a_no_op_when_nothing_was_clipped():
    layer = torch.nn.Linear(8, 8)
    undo = GradientClipUndo()
    undo.attach(layer.parameters())
    (layer(torch.randn(4, 8) * 1e-3).sum()).backward()
    raw = [p.grad.clone() for p in layer.parameters()]  # type: ignore[union-attr]
    undo.restore(list(layer.parameters()))
    for p, g in zip(layer.parameters(), raw):
        assert torch.equal(p.grad, g)  # type: ignore[arg-type]


def test_restore_follows_parameters_replaced_by_assign_loading():
    sae = GatedTrainingSAE(
        build_gated_training_cfg(clip_grad_norm=False, resample_dead=False)
    )
    sae.load_state_dict(
        {k: v.clone() for k, v in sae.state_dict().items()}, assign=True
    )
    norms: list[float] = []
    params = list(sae.parameters())

    def pre(*_: Any) -> None:
        norms.append(
            float(
                torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])
                )
            )
        )

    handle = register_optimizer_step_pre_hook(pre)
    data = SparseSyntheticData(d_in=16)
    try:
        make_trainer(sae, iter([next(data) * 50 for _ in range(2)]), steps=2).fit()
    finally:
        handle.remove()
    assert max(norms) > 10.0
