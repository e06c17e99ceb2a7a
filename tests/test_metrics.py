import pytest
import torch

from sae_lens_gated import metrics, relative_reconstruction_bias


def test_half_reconstruction_gives_one_half():
    x = torch.ones(10, 1)
    assert relative_reconstruction_bias(x, 0.5 * x) == pytest.approx(0.5)


def test_perfect_reconstruction_gives_one():
    x = torch.randn(50, 8)
    assert relative_reconstruction_bias(x, x.clone()) == pytest.approx(1.0)


@pytest.mark.parametrize("c", [0.3, 0.9, 1.7])
def test_scaling_reconstructions_scales_gamma(c: float):
    x = torch.randn(100, 8, dtype=torch.float64)
    x_hat = x + 0.3 * torch.randn(100, 8, dtype=torch.float64)
    gamma = relative_reconstruction_bias(x, x_hat)
    assert relative_reconstruction_bias(x, c * x_hat) == pytest.approx(
        c * gamma, rel=1e-9
    )


def test_both_closed_forms_agree():
    x = torch.randn(200, 16, dtype=torch.float64)
    x_hat = 0.8 * x + 0.2 * torch.randn(200, 16, dtype=torch.float64)
    sq_hat = x_hat.pow(2).sum(-1).mean()
    sq_x = x.pow(2).sum(-1).mean()
    sq_err = (x_hat - x).pow(2).sum(-1).mean()
    second_form = float(2 * sq_hat / (sq_hat + sq_x - sq_err))
    assert relative_reconstruction_bias(x, x_hat) == pytest.approx(
        second_form, rel=1e-12
    )


def test_gamma_is_a_ratio_of_batch_means_not_a_mean_of_ratios():
    x = torch.tensor([[1.0], [10.0]])
    x_hat = torch.tensor([[2.0], [10.0]])
    # (4 + 100) / (2 + 100), not the mean of 2 and 1
    assert relative_reconstruction_bias(x, x_hat) == pytest.approx(104 / 102)


def test_gamma_is_the_inverse_of_the_best_rescaling():
    x = torch.randn(300, 4, dtype=torch.float64)
    x_hat = 0.7 * x + 0.1 * torch.randn(300, 4, dtype=torch.float64)
    gamma = relative_reconstruction_bias(x, x_hat)

    def err(g: float) -> float:
        return float((x_hat / g - x).pow(2).sum(-1).mean())

    assert err(gamma) < err(gamma * 1.01) and err(gamma) < err(gamma * 0.99)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        relative_reconstruction_bias(torch.ones(3, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="non-empty"):
        relative_reconstruction_bias(torch.ones(0, 2), torch.ones(0, 2))
    with pytest.raises(ValueError, match="undefined"):
        relative_reconstruction_bias(torch.ones(3, 2), torch.zeros(3, 2))


def test_the_widest_float_is_float64_but_on_mps():
    for device in ("cpu", "cuda", "meta"):
        assert metrics.widest_float(torch.device(device)) is torch.float64
    assert metrics.widest_float(torch.device("mps")) is torch.float32


def test_gamma_is_computed_in_the_widest_float_of_the_device(
    monkeypatch: pytest.MonkeyPatch,
):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    x_hat = 0.8 * x + 0.1 * torch.randn(64, 8, generator=gen)
    wide = metrics.relative_reconstruction_bias_tensor(x, x_hat)
    assert wide.dtype is torch.float64
    # A device without float64 (MPS) computes it in float32, to float32's precision.
    monkeypatch.setattr(metrics, "widest_float", lambda _device: torch.float32)
    narrow = metrics.relative_reconstruction_bias_tensor(x, x_hat)
    assert narrow.dtype is torch.float32
    torch.testing.assert_close(narrow.double(), wide, rtol=1e-6, atol=0)
