from typing import Any

import pytest
import torch

import sae_lens_gated.saes.gated_encoder as gated_encoder
from sae_lens_gated import GatedSAE, GatedSAEConfig, GatedTrainingSAE
from tests.helpers import build_gated_training_cfg, randomize_gated_params


def _sparse_features(n: int, d_sae: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    open_ = torch.rand(n, d_sae, generator=gen) < density
    return open_ * torch.rand(n, d_sae, generator=gen)


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


@pytest.mark.parametrize("normalize_activations", ["none", "layer_norm"])
def test_decode_on_the_support_equals_the_dense_product(
    sparse_decodes: list[str], normalize_activations: str
):
    sae = GatedSAE(
        GatedSAEConfig(d_in=16, d_sae=200, normalize_activations=normalize_activations)  # type: ignore[arg-type]
    )
    randomize_gated_params(sae, seed=1)
    x = torch.randn(64, 16)
    f = _sparse_features(64, 200, 0.02, seed=2)
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
