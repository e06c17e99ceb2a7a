from typing import Any

import pytest
import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE as BuiltinGatedTrainingSAE
from sae_lens.saes.gated_sae import (
    GatedTrainingSAEConfig as BuiltinGatedTrainingSAEConfig,
)

import sae_lens_gated.saes.gated_function as gated_function
from sae_lens_gated import GatedSAE, GatedSAEConfig, GatedTrainingSAE
from tests.helpers import (
    GATED_PARAM_NAMES,
    build_gated_training_cfg,
    copy_params,
    randomize_gated_params,
    reference_paper_losses,
    step_input,
)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64-row chunks for d_sae=48 in float64: a batch of 200 becomes 64+64+64+8 rows.
    monkeypatch.setattr(gated_function, "_CPU_CHUNK_BYTES", 64 * 48 * 8)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"recipe": "april_update"},
        {"weight_tying": "none"},
        {"apply_b_dec_to_input": False, "freeze_decoder_in_aux": False},
    ],
)
def test_chunked_function_matches_the_plain_reference(kwargs: dict[str, Any]):
    assert (
        len(gated_function._chunks(200, 48, torch.empty(1, dtype=torch.float64))) == 4
    )
    cfg = build_gated_training_cfg(dtype="float64", **kwargs)
    sae = GatedTrainingSAE(cfg)
    randomize_gated_params(sae, seed=21, unit_decoder=bool(cfg.unit_norm_decoder))
    if cfg.weight_tying == "none":
        with torch.no_grad():
            sae.r_mag.zero_()
    x = torch.randn(200, 16, dtype=torch.float64)
    out = sae.training_forward_pass(step_input(x, l1=0.4))
    params = {name: getattr(sae, name) for name in GATED_PARAM_NAMES}
    expected = reference_paper_losses(
        params,
        x,
        l1_coefficient=0.4,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        freeze_decoder_in_aux=bool(cfg.freeze_decoder_in_aux),
        l1_scale_by_decoder_norm=bool(cfg.l1_scale_by_decoder_norm),
    )
    got_total = torch.stack(list(out.losses.values())).sum()
    want_total = torch.stack(list(expected.values())).sum()
    torch.testing.assert_close(got_total, want_total, rtol=1e-12, atol=0)
    trainable = [p for p in params.values() if p.requires_grad]
    got = torch.autograd.grad(got_total, trainable)
    want = torch.autograd.grad(want_total, trainable)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("small_chunks")
def test_input_gradient_matches_autograd():
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48, dtype="float64"))
    randomize_gated_params(sae, seed=22)
    x = torch.randn(200, 16, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sae.encode(x).pow(2).sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    centered = x_ref - sae.b_dec
    pre = centered @ sae.W_enc
    f = (pre + sae.b_gate > 0) * torch.relu(pre * sae.r_mag.exp() + sae.b_mag)
    (grad_ref,) = torch.autograd.grad(f.pow(2).sum(), x_ref)
    assert grad_ref.abs().max() > 0
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("small_chunks")
def test_features_only_inference_matches_the_full_path():
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48, dtype="float64"))
    randomize_gated_params(sae, seed=26)
    x = torch.randn(200, 16, dtype=torch.float64)
    with_grad = sae.encode(x)
    assert with_grad.requires_grad  # the full path, ready for backward
    with torch.no_grad():
        features_only = sae.encode(x)
    assert not features_only.requires_grad
    assert (features_only > 0).float().mean() > 0.1
    torch.testing.assert_close(features_only, with_grad.detach(), rtol=0, atol=0)
    cached: list[torch.Tensor] = []
    sae.hook_sae_acts_pre.add_hook(lambda act, hook: cached.append(act))  # type: ignore[misc]  # noqa: ARG005
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), with_grad.detach(), rtol=0, atol=0)
    assert cached and cached[0].shape == (200, 48)  # hooks still see the pre-activation


def test_hooks_on_activations_route_the_decoder_through_them():
    sae = GatedTrainingSAE(build_gated_training_cfg(dtype="float64"))
    randomize_gated_params(sae, seed=23, unit_decoder=True)
    x = torch.randn(30, 16, dtype=torch.float64)
    plain = sae.training_forward_pass(step_input(x))
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 2)  # type: ignore[misc]  # noqa: ARG005
    hooked = sae.training_forward_pass(step_input(x))
    torch.testing.assert_close(hooked.feature_acts, 2 * plain.feature_acts)
    expected_out = hooked.feature_acts @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(hooked.sae_out, expected_out)
    assert not torch.allclose(hooked.sae_out, plain.sae_out)


def test_training_through_a_hook_that_replaces_the_pre_activation():
    sae = GatedTrainingSAE(build_gated_training_cfg(dtype="float64"))
    randomize_gated_params(sae, seed=27, unit_decoder=True)
    sae.hook_sae_acts_pre.add_hook(lambda acts, hook: acts * 2)  # type: ignore[misc]  # noqa: ARG005
    x = torch.randn(30, 16, dtype=torch.float64)
    out = sae.training_forward_pass(step_input(x))
    params = [getattr(sae, name) for name in GATED_PARAM_NAMES]
    got = torch.autograd.grad(out.losses["mse_loss"], params, allow_unused=True)

    centered = x - sae.b_dec
    pre = centered @ sae.W_enc
    f = (pre + sae.b_gate > 0) * torch.relu(2 * (pre * sae.r_mag.exp() + sae.b_mag))
    mse = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse_loss"], mse)
    want = torch.autograd.grad(mse, params, allow_unused=True)
    for name, g, w, p in zip(GATED_PARAM_NAMES, got, want, params):
        g = torch.zeros_like(p) if g is None else g
        w = torch.zeros_like(p) if w is None else w
        assert w.abs().max() > 0 or name == "b_gate", (
            name
        )  # the gate's bias: no gradient
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_autocast_stays_close_to_float32():
    sae = GatedTrainingSAE(build_gated_training_cfg())
    randomize_gated_params(sae, seed=24, unit_decoder=True)
    x = torch.randn(64, 16)
    exact = sae.training_forward_pass(step_input(x))
    exact_grads = torch.autograd.grad(exact.loss, list(sae.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sae.training_forward_pass(step_input(x))
    assert mixed.feature_acts.dtype == torch.bfloat16
    mixed_grads = torch.autograd.grad(mixed.loss, list(sae.parameters()))
    torch.testing.assert_close(mixed.loss.float(), exact.loss, rtol=2e-2, atol=0)
    for got, want, param in zip(mixed_grads, exact_grads, sae.parameters()):
        assert got.dtype == param.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 5e-2


def _large_saved_tensors(run: Any, n: int, d_sae: int) -> int:
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += tensor.numel() >= n * d_sae
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return count


def test_backward_keeps_only_its_three_outputs():
    n, d_sae = 64, 48
    plugin = GatedTrainingSAE(build_gated_training_cfg())
    builtin = BuiltinGatedTrainingSAE(
        BuiltinGatedTrainingSAEConfig(d_in=16, d_sae=d_sae)
    )
    copy_params(plugin, builtin)
    x = torch.randn(n, 16)
    assert (
        _large_saved_tensors(
            lambda: plugin.training_forward_pass(step_input(x)), n, d_sae
        )
        == 3
    )
    assert (
        _large_saved_tensors(
            lambda: builtin.training_forward_pass(step_input(x)), n, d_sae
        )
        >= 6
    )


def test_training_forward_traces_without_graph_breaks():
    import torch._dynamo

    for recipe in ("paper", "april_update"):
        sae = GatedTrainingSAE(build_gated_training_cfg(recipe=recipe))
        for logging_step in (False, True):
            step = step_input(torch.randn(8, 16))
            step.is_logging_step = logging_step
            explanation = torch._dynamo.explain(sae.training_forward_pass)(step)
            assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_training_step_matches_eager():
    eager = GatedTrainingSAE(build_gated_training_cfg())
    randomize_gated_params(eager, seed=25, unit_decoder=True)
    compiled_sae = GatedTrainingSAE(build_gated_training_cfg())
    copy_params(eager, compiled_sae)
    x = torch.randn(32, 16)
    compiled = torch.compile(compiled_sae.training_forward_pass, backend="aot_eager")
    eager.training_forward_pass(step_input(x)).loss.backward()
    compiled(step_input(x)).loss.backward()
    for a, b in zip(eager.parameters(), compiled_sae.parameters()):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
