from typing import Any

import pytest
import torch

import sae_lens_gated.saes.gated_encoder as gated_encoder
from sae_lens_gated import GatedSAE, GatedSAEConfig, GatedTrainingSAE
from tests.helpers import (
    DEVICES,
    GATED_PARAM_NAMES,
    build_gated_training_cfg,
    randomize_gated_params,
    step_input,
)


def _sparse_features(
    n: int, d_sae: int, density: float, seed: int, device: str = "cpu"
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    open_ = torch.rand(n, d_sae, generator=gen) < density
    return (open_ * torch.rand(n, d_sae, generator=gen)).to(device)


@pytest.fixture
def sparse_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The layouts ``decode`` handed to the support-only decoder."""
    calls: list[str] = []
    real = gated_encoder.sparse_decode

    def spy(features: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(str(features.layout))
        return real(features, *args)

    monkeypatch.setattr(gated_encoder, "sparse_decode", spy)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize_activations", ["none", "layer_norm"])
def test_decode_on_the_support_equals_the_dense_product(
    sparse_decodes: list[str], normalize_activations: str, device: str
):
    sae = GatedSAE(
        GatedSAEConfig(
            d_in=16,
            d_sae=200,
            normalize_activations=normalize_activations,  # type: ignore[arg-type]
            device=device,
        )
    )
    randomize_gated_params(sae, seed=1)
    x = torch.randn(64, 16).to(device)
    f = _sparse_features(64, 200, 0.02, seed=2, device=device)
    sae.encode(x)  # sets the layer-norm statistics decode undoes
    expected = sae.run_time_activation_norm_fn_out(f @ sae.W_dec + sae.b_dec)
    with torch.no_grad():
        for features in (f, f.to_sparse_coo(), f.to_sparse_csr()):
            sae.encode(x)
            torch.testing.assert_close(sae.decode(features), expected)
    assert sparse_decodes == ["torch.strided", "torch.sparse_coo", "torch.sparse_csr"]


def test_dense_features_that_are_mostly_nonzero_or_need_gradients_decode_densely(
    sparse_decodes: list[str],
):
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=200))
    randomize_gated_params(sae, seed=3)
    with torch.no_grad():
        sae.decode(_sparse_features(64, 200, 0.5, seed=4))
    assert sparse_decodes == []
    f = _sparse_features(64, 200, 0.02, seed=5).requires_grad_(True)
    out = sae.decode(f)
    assert sparse_decodes == []
    (grad,) = torch.autograd.grad(out.sum(), f)
    # The dense product's gradient, including at the features that are 0 (attribution).
    torch.testing.assert_close(grad, sae.W_dec.sum(dim=1).expand(64, 200))


def test_training_sae_decode_is_the_same_function():
    sae = GatedTrainingSAE(build_gated_training_cfg(d_sae=200))
    randomize_gated_params(sae, seed=6)
    f = _sparse_features(32, 200, 0.02, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)
        torch.testing.assert_close(sae.decode(f.to_sparse_coo()), sae.decode(f))


def test_hooks_on_the_reconstruction_see_the_decoded_values():
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=200))
    randomize_gated_params(sae, seed=8)
    seen: list[torch.Tensor] = []
    sae.hook_sae_recons.add_hook(lambda t, **_: seen.append(t.clone()))  # type: ignore[misc]
    f = _sparse_features(8, 200, 0.02, seed=9)
    with torch.no_grad():
        out = sae.decode(f)
    (hooked,) = seen
    torch.testing.assert_close(hooked, out)
    torch.testing.assert_close(out, f @ sae.W_dec + sae.b_dec)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("device", DEVICES)
def test_features_only_inference_matches_the_full_path(device: str):
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48, dtype="float64", device=device))
    randomize_gated_params(sae, seed=26)
    x = torch.randn(200, 16, dtype=torch.float64).to(device)
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
