import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig
from sae_lens.registry import get_sae_class, get_sae_training_class

from sae_lens_gated import (
    GatedUntiedSAE,
    GatedUntiedSAEConfig,
    GatedUntiedTrainingSAE,
    GatedUntiedTrainingSAEConfig,
)
from sae_lens_gated.conversion import GatedSAEExportError, to_jumprelu
from tests.helpers import (
    DEVICES,
    SparseSyntheticData,
    make_trainer,
    randomize_gated_params,
    reference_paper_losses,
    step_input,
    tiny_runner_dict,
)

PARAMS = ["W_enc", "W_mag", "W_dec", "b_dec", "b_gate", "b_mag"]


def _cfg(**kwargs: Any) -> GatedUntiedTrainingSAEConfig:
    settings: dict[str, Any] = {"d_in": 16, "d_sae": 48}
    settings.update(kwargs)
    return GatedUntiedTrainingSAEConfig(**settings)


def _randomize(sae: GatedUntiedTrainingSAE | GatedUntiedSAE, seed: int) -> None:
    randomize_gated_params(sae, seed=seed, unit_decoder=True)
    with torch.no_grad():
        sae.W_mag.copy_(torch.randn_like(sae.W_mag) * 0.3)


def test_untied_has_a_free_magnitude_encoder_and_no_r_mag():
    sae = GatedUntiedTrainingSAE(_cfg())
    names = {name for name, _ in sae.named_parameters()}
    assert names == set(PARAMS)
    torch.testing.assert_close(sae.W_mag, sae.W_enc)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.cfg.architecture() == "gated_untied"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["paper", "april_update"])
@pytest.mark.parametrize("sparse_step", ["never", "always"])
def test_untied_losses_and_gradients_match_the_plain_reference(
    recipe: str, sparse_step: str, device: str
):
    cfg = _cfg(recipe=recipe, dtype="float64", sparse_step=sparse_step, device=device)
    sae = GatedUntiedTrainingSAE(cfg)
    _randomize(sae, seed=31)
    x = torch.randn(40, 16, dtype=torch.float64).to(device)
    out = sae.training_forward_pass(step_input(x, l1=0.6))
    params = {name: getattr(sae, name) for name in PARAMS}
    expected = reference_paper_losses(
        params,
        x,
        l1_coefficient=0.6,
        freeze_decoder_in_aux=bool(cfg.freeze_decoder_in_aux),
        l1_scale_by_decoder_norm=bool(cfg.l1_scale_by_decoder_norm),
    )
    for name, value in expected.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-12, atol=0)
    got = torch.autograd.grad(out.loss, list(params.values()))
    want = torch.autograd.grad(
        torch.stack(list(expected.values())).sum(), list(params.values())
    )
    for name, g, w in zip(PARAMS, got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
    assert got[PARAMS.index("W_mag")].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_untied_trains_with_unit_norm_decoder_and_resamples_both_encoders(device: str):
    sae = GatedUntiedTrainingSAE(
        _cfg(
            d_sae=128,
            l1_coefficient=3.0,
            resample_every=100,
            resample_window=50,
            resample_pool_size=1024,
            device=device,
        )
    )
    make_trainer(
        sae,
        SparseSyntheticData(d_in=16, n_features=4, p_fire=0.1),
        steps=100,
        device=device,
    ).fit()
    ones = torch.ones(128, device=device)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), ones, atol=1e-5, rtol=0)
    assert (
        sae.conventions.resampler is not None
        and sae.conventions.resampler.last_event is not None
    )
    idx = sae.conventions.resampler.last_event.resampled
    assert idx.numel() > 0
    for encoder in (sae.W_enc, sae.W_mag):
        cos = torch.nn.functional.cosine_similarity(encoder[:, idx].T, sae.W_dec[idx])
        torch.testing.assert_close(cos, ones[: idx.numel()], atol=1e-5, rtol=0)
    assert torch.equal(sae.b_gate[idx], torch.zeros(idx.numel(), device=device))


def test_untied_saves_and_loads_with_the_plugin(tmp_path: Path):
    sae = GatedUntiedTrainingSAE(_cfg())
    _randomize(sae, seed=32)
    sae.save_inference_model(tmp_path / "inference")
    sae.save_model(tmp_path / "checkpoint")
    assert json.loads((tmp_path / "inference" / "cfg.json").read_text())[
        "architecture"
    ] == ("gated_untied")
    inference = SAE.load_from_disk(tmp_path / "inference")
    assert type(inference) is GatedUntiedSAE
    checkpoint = GatedUntiedTrainingSAE.load_from_disk(tmp_path / "checkpoint")
    x = torch.randn(25, 16)
    with torch.no_grad():
        expected = sae(x)
        torch.testing.assert_close(inference(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(checkpoint(x), expected, rtol=1e-5, atol=1e-6)
        features = sae.encode(x)
        centered = x - sae.b_dec
        manual = (centered @ sae.W_enc + sae.b_gate > 0) * torch.relu(
            centered @ sae.W_mag + sae.b_mag
        )
        torch.testing.assert_close(features, manual)


def test_untied_fold_W_dec_norm_keeps_outputs():
    sae = GatedUntiedSAE(GatedUntiedSAEConfig(d_in=16, d_sae=48))
    _randomize(sae, seed=33)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) + 0.5)
        x = torch.randn(20, 16)
        before = sae(x)
        sae.fold_W_dec_norm()
        torch.testing.assert_close(
            sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(sae(x), before, rtol=1e-5, atol=1e-5)


def test_untied_is_registered_and_reachable_from_runner_configs(tmp_path: Path):
    assert get_sae_training_class("gated_untied")[0] is GatedUntiedTrainingSAE
    assert get_sae_class("gated_untied")[0] is GatedUntiedSAE
    cfg = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(tmp_path, sae={"architecture": "gated_untied"})
    )
    assert type(cfg.sae) is GatedUntiedTrainingSAEConfig


def test_untied_config_rejects_what_does_not_apply():
    with pytest.raises(ValueError, match="weight_tying does not apply"):
        _cfg(weight_tying="none")
    with pytest.raises(ValueError, match="covariance_whitening"):
        _cfg(normalize_activations="covariance_whitening")


def test_conversions_refuse_the_untied_architecture():
    sae = GatedUntiedSAE(GatedUntiedSAEConfig(d_in=8, d_sae=16))
    with pytest.raises(GatedSAEExportError, match="gated_untied"):
        to_jumprelu(sae)
