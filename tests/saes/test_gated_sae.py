import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.gated_sae import GatedSAE as BuiltinGatedSAE
from sae_lens.saes.gated_sae import GatedSAEConfig as BuiltinGatedSAEConfig
from sae_lens.saes.gated_sae import GatedTrainingSAE as BuiltinGatedTrainingSAE
from sae_lens.saes.gated_sae import (
    GatedTrainingSAEConfig as BuiltinGatedTrainingSAEConfig,
)
from sae_lens.saes.sae import SAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from safetensors.torch import save_file

from sae_lens_gated import (
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    NonFiniteBatchError,
    to_jumprelu,
)
from sae_lens_gated.saes import gated_sparse
from tests.helpers import (
    DEVICES,
    GATED_PARAM_NAMES,
    SparseSyntheticData,
    build_gated_training_cfg,
    copy_params,
    float32_tolerance,
    make_trainer,
    randomize_gated_params,
    reference_paper_losses,
    step_input,
)


def _grads(sae: SAE[Any], loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n in GATED_PARAM_NAMES if getattr(sae, n).requires_grad]
    params = [getattr(sae, name) for name in names]
    grads = dict(
        zip(
            names,
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True),
        )
    )
    return {
        name: torch.zeros_like(getattr(sae, name))
        if grads.get(name) is None
        else grads[name]
        for name in GATED_PARAM_NAMES
    }


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_april_update_recipe_matches_builtin_losses_and_gradients():
    builtin = BuiltinGatedTrainingSAE(BuiltinGatedTrainingSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(builtin, seed=1)
    plugin = GatedTrainingSAE(build_gated_training_cfg(recipe="april_update"))
    copy_params(builtin, plugin)
    x = torch.randn(64, 16)

    out_builtin = builtin.training_forward_pass(step_input(x))
    out_plugin = plugin.training_forward_pass(step_input(x))

    assert set(out_plugin.losses) == set(out_builtin.losses)
    for name, value in out_builtin.losses.items():
        assert value.item() > 0
        assert _rel_err(out_plugin.losses[name], value) <= 1e-5, name
    assert _rel_err(out_plugin.loss, out_builtin.loss) <= 1e-5
    torch.testing.assert_close(out_plugin.feature_acts, out_builtin.feature_acts)
    torch.testing.assert_close(out_plugin.hidden_pre, out_builtin.hidden_pre)

    grads_builtin = _grads(builtin, out_builtin.loss)
    grads_plugin = _grads(plugin, out_plugin.loss)
    for name in GATED_PARAM_NAMES:
        assert grads_builtin[name].abs().max() > 0, name
        assert _rel_err(grads_plugin[name], grads_builtin[name]) <= 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize(
    "recipe_kwargs",
    [
        {},
        {"recipe": "april_update"},
        {"freeze_decoder_in_aux": False},
        {"aux_coefficient": 0.25},
    ],
)
def test_losses_and_gradients_match_plain_reference(
    apply_b_dec_to_input: bool, recipe_kwargs: dict[str, Any], device: str
):
    cfg = build_gated_training_cfg(
        apply_b_dec_to_input=apply_b_dec_to_input,
        dtype="float64",
        device=device,
        **recipe_kwargs,
    )
    sae = GatedTrainingSAE(cfg)
    randomize_gated_params(sae, seed=2, unit_decoder=bool(cfg.unit_norm_decoder))
    x = torch.randn(32, 16, dtype=torch.float64).to(device)

    out = sae.training_forward_pass(step_input(x, l1=0.3))
    params = {name: getattr(sae, name) for name in GATED_PARAM_NAMES}
    expected = reference_paper_losses(
        params,
        x,
        l1_coefficient=0.3,
        aux_coefficient=cfg.aux_coefficient,
        apply_b_dec_to_input=apply_b_dec_to_input,
        freeze_decoder_in_aux=bool(cfg.freeze_decoder_in_aux),
        l1_scale_by_decoder_norm=bool(cfg.l1_scale_by_decoder_norm),
    )
    for name, value in expected.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-10, atol=1e-12)
        got = _grads(sae, out.losses[name])
        want = _grads(sae, value)
        for param in GATED_PARAM_NAMES:
            torch.testing.assert_close(got[param], want[param], rtol=1e-9, atol=1e-12)


def test_paper_loss_equals_hand_computed_value():
    # d_in = 2, d_sae = 2, one example, every intermediate by hand.
    sae = GatedTrainingSAE(build_gated_training_cfg(d_in=2, d_sae=2, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
        sae.b_gate.copy_(torch.tensor([0.0, 0.25]))
        sae.b_mag.copy_(torch.tensor([0.5, 0.0]))
        sae.r_mag.copy_(torch.tensor([0.0, torch.log(torch.tensor(2.0)).item()]))
    x = torch.tensor([[1.5, 0.5]], dtype=torch.float64)
    # centered = [1, 1]; pre = [1.5, 1]; pi_gate = [1.5, 1.25]; pi_mag = [2, 2]
    # f = [2, 2]; x_hat = [2.5, 1.5]; mse = 1 + 1 = 2
    # relu(pi_gate) = [1.5, 1.25]; l1 = 0.5 * 2.75 = 1.375
    # aux recon = [2, 0.75]; aux = 0.25 + 0.0625 = 0.3125
    out = sae.training_forward_pass(step_input(x, l1=0.5))
    assert out.losses["mse_loss"].item() == pytest.approx(2.0)
    assert out.losses["l1_loss"].item() == pytest.approx(1.375)
    assert out.losses["auxiliary_reconstruction_loss"].item() == pytest.approx(0.3125)
    assert out.loss.item() == pytest.approx(3.6875)
    torch.testing.assert_close(
        out.feature_acts, torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    )


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_paper_recipe_gradient_flow_invariants(apply_b_dec_to_input: bool):
    sae = GatedTrainingSAE(
        build_gated_training_cfg(apply_b_dec_to_input=apply_b_dec_to_input)
    )
    randomize_gated_params(sae, seed=3, unit_decoder=True)
    out = sae.training_forward_pass(step_input(torch.randn(64, 16)))

    aux = _grads(sae, out.losses["auxiliary_reconstruction_loss"])
    for name in ["W_dec", "r_mag", "b_mag"]:
        assert torch.equal(aux[name], torch.zeros_like(aux[name])), name
    assert aux["W_enc"].abs().max() > 0
    assert aux["b_gate"].abs().max() > 0
    if apply_b_dec_to_input:
        # Only through the centering x - b_dec, which App. G does not stop.
        centring_only = -(aux["b_gate"] @ sae.W_enc.T)
        torch.testing.assert_close(aux["b_dec"], centring_only)
    else:
        assert torch.equal(aux["b_dec"], torch.zeros_like(aux["b_dec"]))

    recon = _grads(sae, out.losses["mse_loss"])
    assert torch.equal(recon["b_gate"], torch.zeros_like(recon["b_gate"]))
    for name in ["W_enc", "W_dec", "b_dec", "b_mag", "r_mag"]:
        assert recon[name].abs().max() > 0, name

    sparsity = _grads(sae, out.losses["l1_loss"])
    for name in ["W_dec", "r_mag", "b_mag"]:
        assert torch.equal(sparsity[name], torch.zeros_like(sparsity[name])), name
    for term in (aux, recon, sparsity):
        assert term["W_enc"].abs().max() > 0


def test_april_update_aux_loss_trains_the_decoder():
    sae = GatedTrainingSAE(build_gated_training_cfg(recipe="april_update"))
    randomize_gated_params(sae, seed=4)
    out = sae.training_forward_pass(step_input(torch.randn(32, 16)))
    aux = _grads(sae, out.losses["auxiliary_reconstruction_loss"])
    assert aux["W_dec"].abs().max() > 0
    l1 = _grads(sae, out.losses["l1_loss"])
    assert l1["W_dec"].abs().max() > 0


def test_weight_tying_none_keeps_r_mag_out_of_the_graph():
    sae = GatedTrainingSAE(build_gated_training_cfg(weight_tying="none"))
    randomize_gated_params(sae, seed=5, unit_decoder=True)
    with torch.no_grad():
        sae.r_mag.zero_()
    x = torch.randn(16, 16)
    out = sae.training_forward_pass(step_input(x))
    out.loss.backward()
    assert sae.r_mag.grad is None
    assert not sae.r_mag.requires_grad
    centered = x - sae.b_dec
    expected_mag = centered @ sae.W_enc + sae.b_mag
    torch.testing.assert_close(out.hidden_pre, expected_mag)


def test_a_frozen_non_zero_r_mag_is_applied_everywhere(tmp_path: Path):
    # weight_tying="none" freezes r_mag; a non-zero value (e.g. loaded from a file) must
    # act the same in training, inference, exports and after a save/load round trip.
    sae = GatedTrainingSAE(build_gated_training_cfg(weight_tying="none"))
    randomize_gated_params(sae, seed=6, unit_decoder=True)
    assert sae.r_mag.abs().max() > 0.1
    x = torch.randn(64, 16)
    centered = x - sae.b_dec
    pre = centered @ sae.W_enc
    expected = (pre + sae.b_gate > 0) * torch.relu(pre * sae.r_mag.exp() + sae.b_mag)
    out = sae.training_forward_pass(step_input(x))
    torch.testing.assert_close(out.feature_acts, expected)
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(to_jumprelu(sae).encode(x), expected)
    sae.save_inference_model(tmp_path)
    torch.testing.assert_close(GatedSAE.load_from_disk(tmp_path).encode(x), expected)
    out.loss.backward()
    assert sae.r_mag.grad is None


def _normalize_activations_modes() -> list[str]:
    modes = []
    for mode in (
        "none",
        "expected_average_only_in",
        "constant_norm_rescale",
        "layer_norm",
        "covariance_whitening",  # SAELens >= 6.51
    ):
        try:
            BuiltinGatedTrainingSAEConfig(d_in=4, d_sae=4, normalize_activations=mode)  # type: ignore[arg-type]
        except ValueError:
            continue
        modes.append(mode)
    return modes


# Modes whose normalization runs inside the SAE at every forward pass (the others are
# applied to the batch by SAELens's trainer before the SAE sees it).
_RUN_TIME_MODES = ("constant_norm_rescale", "layer_norm")


@pytest.mark.parametrize("mode", _normalize_activations_modes())
def test_april_update_equals_builtin_in_every_normalization_mode(mode: str):
    builtin = BuiltinGatedTrainingSAE(
        BuiltinGatedTrainingSAEConfig(d_in=16, d_sae=48, normalize_activations=mode)  # type: ignore[arg-type]
    )
    randomize_gated_params(builtin, seed=1)
    plugin = GatedTrainingSAE(
        build_gated_training_cfg(recipe="april_update", normalize_activations=mode)
    )
    copy_params(builtin, plugin)
    x = torch.randn(64, 16) * 3.0 + 1.0
    out_plugin = plugin.training_forward_pass(step_input(x))
    if mode in _RUN_TIME_MODES:
        # The built-in computes its reconstruction loss in raw units but its gate (aux and
        # sparsity terms) on un-normalized inputs; the plugin computes all three terms in
        # the normalized space, i.e. it equals the built-in given inputs normalized first.
        reference = BuiltinGatedTrainingSAE(
            BuiltinGatedTrainingSAEConfig(d_in=16, d_sae=48)
        )
        copy_params(builtin, reference)
        x_normalized = builtin.run_time_activation_norm_fn_in(x)
        out_builtin = reference.training_forward_pass(step_input(x_normalized))
        raw_out = builtin.run_time_activation_norm_fn_out(out_builtin.sae_out)
        torch.testing.assert_close(out_plugin.sae_out, raw_out, rtol=1e-5, atol=1e-5)
    else:
        reference = builtin
        out_builtin = builtin.training_forward_pass(step_input(x))
        torch.testing.assert_close(out_plugin.sae_out, out_builtin.sae_out)
    for name, value in out_builtin.losses.items():
        assert _rel_err(out_plugin.losses[name], value) <= 1e-5, name
    grads_builtin = _grads(reference, out_builtin.loss)
    grads_plugin = _grads(plugin, out_plugin.loss)
    for name in GATED_PARAM_NAMES:
        assert grads_builtin[name].abs().max() > 0, name
        assert _rel_err(grads_plugin[name], grads_builtin[name]) <= 1e-5, name


@pytest.mark.parametrize("mode", _RUN_TIME_MODES)
def test_the_three_loss_terms_share_one_space_under_run_time_normalization(mode: str):
    # Scaling the raw batch must not change any term: all three live in the SAE's
    # normalized space, so the paper's 1:1 weighting of the two reconstructions holds.
    sae = GatedTrainingSAE(build_gated_training_cfg(normalize_activations=mode))
    randomize_gated_params(sae, seed=2, unit_decoder=True)
    x = torch.randn(64, 16) + 0.5
    small = sae.training_forward_pass(step_input(x)).losses
    large = sae.training_forward_pass(step_input(x * 29.0)).losses
    for name, value in small.items():
        assert value > 0, name
        torch.testing.assert_close(large[name], value, rtol=1e-4, atol=1e-6)


def _train_one_feature_toy(sae: SAE[Any], steps: int = 2500) -> float:
    """Paper Fig. 2: x = 1, one unit decoder direction, lambda = 1."""
    with torch.no_grad():
        sae.W_dec.fill_(1.0)
        sae.W_enc.fill_(1.0)
        sae.b_dec.zero_()
    sae.W_dec.requires_grad_(False)
    sae.b_dec.requires_grad_(False)
    params = [p for p in sae.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    x = torch.ones(8, 1)
    for _ in range(steps):
        optimizer.zero_grad()
        sae.training_forward_pass(step_input(x, l1=1.0)).loss.backward()  # type: ignore[attr-defined]
        optimizer.step()
    with torch.no_grad():
        return sae.decode(sae.encode(x)).mean().item()


def test_single_feature_shrinkage_toy_baseline_halves_while_gated_reconstructs():
    baseline = StandardTrainingSAE(
        StandardTrainingSAEConfig(d_in=1, d_sae=1, decoder_init_norm=1.0)
    )
    gated = GatedTrainingSAE(build_gated_training_cfg(d_in=1, d_sae=1))
    assert _train_one_feature_toy(baseline) == pytest.approx(0.5, abs=0.01)
    assert _train_one_feature_toy(gated) == pytest.approx(1.0, abs=0.01)


def test_without_the_aux_loss_the_gates_close():
    def l0_after(aux_coefficient: float) -> float:
        torch.manual_seed(0)
        sae = GatedTrainingSAE(
            build_gated_training_cfg(
                aux_coefficient=aux_coefficient, l1_coefficient=1.0, resample_dead=False
            )
        )
        data = SparseSyntheticData(d_in=16, n_features=16, p_fire=0.1)
        make_trainer(sae, data, steps=600, lr=1e-2).fit()
        batch = torch.cat([next(data) for _ in range(8)])
        with torch.no_grad():
            return float((sae.encode(batch) > 0).float().sum(-1).mean())

    assert l0_after(0.0) < 0.02  # only the L1 reaches the gate: the gates close
    assert l0_after(1.0) > 1.0


def test_inference_encode_equals_builtin_encode():
    cfg = BuiltinGatedSAEConfig(d_in=16, d_sae=48)
    builtin = BuiltinGatedSAE(cfg)
    randomize_gated_params(builtin, seed=6)
    plugin = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    copy_params(builtin, plugin)
    x = torch.randn(200, 16) * 2
    expected = builtin.encode(x)
    got = plugin.encode(x)
    assert (expected > 0).float().mean() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plugin(x), builtin(x), rtol=1e-5, atol=1e-5)


def test_training_encode_equals_inference_encode():
    training = GatedTrainingSAE(build_gated_training_cfg())
    randomize_gated_params(training, seed=7)
    inference = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    copy_params(training, inference)
    x = torch.randn(50, 16)
    torch.testing.assert_close(training.encode(x), inference.encode(x))


def test_encode_keeps_gradients_to_inputs_that_require_them():
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(sae, seed=8)
    builtin = BuiltinGatedSAE(BuiltinGatedSAEConfig(d_in=16, d_sae=48))
    copy_params(sae, builtin)
    x = torch.randn(10, 16, requires_grad=True)
    (grad_plugin,) = torch.autograd.grad(sae(x).pow(2).sum(), x)
    (grad_builtin,) = torch.autograd.grad(builtin(x).pow(2).sum(), x)
    assert grad_builtin.abs().max() > 0
    torch.testing.assert_close(grad_plugin, grad_builtin, rtol=1e-5, atol=1e-5)


def test_fold_W_dec_norm_behaves_as_builtin():
    builtin = BuiltinGatedSAE(BuiltinGatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(builtin, seed=9)
    plugin = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    copy_params(builtin, plugin)
    x = torch.randn(100, 16)
    out_before = plugin(x)
    builtin.fold_W_dec_norm()
    plugin.fold_W_dec_norm()
    for name in GATED_PARAM_NAMES:
        torch.testing.assert_close(getattr(plugin, name), getattr(builtin, name))
    torch.testing.assert_close(
        plugin.W_dec.norm(dim=1), torch.ones(48), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(plugin(x), out_before, rtol=1e-5, atol=1e-5)


def test_inference_activation_norm_folding_behaves_as_builtin():
    builtin = BuiltinGatedSAE(BuiltinGatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(builtin, seed=10)
    plugin = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    copy_params(builtin, plugin)
    builtin.fold_activation_norm_scaling_factor(3.0)
    plugin.fold_activation_norm_scaling_factor(3.0)
    for name in GATED_PARAM_NAMES:
        torch.testing.assert_close(getattr(plugin, name), getattr(builtin, name))


def test_unit_norm_activation_norm_folding_keeps_unit_decoder_and_outputs():
    sae = GatedTrainingSAE(build_gated_training_cfg())
    randomize_gated_params(sae, seed=11, unit_decoder=True)
    x = torch.randn(100, 16)
    scale = 4.0
    with torch.no_grad():
        expected_out = sae(x * scale) / scale
        expected_feats = sae.encode(x * scale) / scale
    sae.fold_activation_norm_scaling_factor(scale)
    assert sae.cfg.normalize_activations == "none"
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), expected_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), expected_feats, rtol=1e-5, atol=1e-5)


def test_error_term_forward_behaves_as_builtin():
    builtin = BuiltinGatedSAE(BuiltinGatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(builtin, seed=12)
    plugin = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    copy_params(builtin, plugin)
    x = torch.randn(20, 16)
    with pytest.warns(DeprecationWarning):
        builtin.use_error_term = True
    with pytest.warns(DeprecationWarning):
        plugin.use_error_term = True
    errors: list[torch.Tensor] = []
    plugin.hook_sae_error.add_hook(lambda act, hook: errors.append(act.clone()))  # type: ignore[misc]  # noqa: ARG005
    out = plugin(x)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, builtin(x), rtol=1e-5, atol=1e-5)
    plugin.use_error_term = False
    torch.testing.assert_close(errors[0], x - plugin(x), rtol=1e-5, atol=1e-5)


def test_training_sae_rejects_error_term_like_builtin():
    with pytest.raises(ValueError, match="use_error_term"):
        GatedTrainingSAE(build_gated_training_cfg(), use_error_term=True)


def test_paper_init():
    sae = GatedTrainingSAE(build_gated_training_cfg(d_in=32, d_sae=64))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    for name in ["b_dec", "b_gate", "b_mag", "r_mag"]:
        assert torch.equal(getattr(sae, name), torch.zeros_like(getattr(sae, name)))
    april = GatedTrainingSAE(build_gated_training_cfg(recipe="april_update"))
    torch.testing.assert_close(
        april.W_dec.norm(dim=1), torch.full((48,), 0.1), atol=1e-6, rtol=0
    )


def test_builtin_config_is_upgraded_with_plugin_defaults(
    caplog: pytest.LogCaptureFixture,
):
    builtin_cfg = BuiltinGatedTrainingSAEConfig(d_in=8, d_sae=16, l1_coefficient=3.0)
    with caplog.at_level(logging.WARNING):
        sae = GatedTrainingSAE(builtin_cfg)
    assert isinstance(sae.cfg, GatedTrainingSAEConfig)
    assert sae.cfg.l1_coefficient == 3.0
    assert sae.cfg.recipe == "paper"
    assert sae.cfg.decoder_init_norm == 1.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "built-in GatedTrainingSAEConfig" in warnings[0]
    assert "recipe='april_update'" in warnings[0] and "unregister()" in warnings[0]


def test_config_resolves_recipe_defaults_and_respects_explicit_values():
    paper = build_gated_training_cfg()
    assert (paper.freeze_decoder_in_aux, paper.l1_scale_by_decoder_norm) == (
        True,
        False,
    )
    assert (paper.unit_norm_decoder, paper.decoder_init_norm) == (True, 1.0)
    april = build_gated_training_cfg(recipe="april_update")
    assert (april.freeze_decoder_in_aux, april.l1_scale_by_decoder_norm) == (
        False,
        True,
    )
    assert (april.unit_norm_decoder, april.decoder_init_norm) == (False, 0.1)
    mixed = build_gated_training_cfg(
        recipe="april_update",
        freeze_decoder_in_aux=True,
        l1_scale_by_decoder_norm=False,
        unit_norm_decoder=True,
    )
    assert mixed.freeze_decoder_in_aux and not mixed.l1_scale_by_decoder_norm
    assert mixed.decoder_init_norm == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"recipe": "april_update", "aux_coefficient": 0.5, "weight_tying": "none"},
        {
            "l1_coefficient": 2.5,
            "l1_warm_up_steps": 100,
            "freeze_decoder_in_aux": False,
        },
    ],
)
def test_config_round_trips_through_dict(kwargs: dict[str, Any]):
    cfg = build_gated_training_cfg(**kwargs)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["architecture"] == "gated"
    restored = GatedTrainingSAEConfig.from_dict(data)
    assert restored == cfg
    assert restored.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recipe": "anthropic"}, "Unknown recipe 'anthropic'"),
        ({"weight_tying": "full"}, "Unknown weight_tying 'full'"),
        ({"l1_coefficient": -1.0}, "l1_coefficient must be >= 0.0"),
        ({"aux_coefficient": -0.5}, "aux_coefficient must be >= 0.0"),
        ({"aux_coefficient": float("nan")}, "aux_coefficient must be finite"),
        ({"l1_warm_up_steps": -3}, "l1_warm_up_steps must be >= 0"),
        ({"decoder_init_norm": 0.0}, "decoder_init_norm must be > 0"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        build_gated_training_cfg(**kwargs)


def test_config_warns_about_combinations_the_authors_advise_against(
    caplog: pytest.LogCaptureFixture,
):
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        build_gated_training_cfg(recipe="april_update", freeze_decoder_in_aux=True)
    assert (
        "l1_scale_by_decoder_norm=True with freeze_decoder_in_aux=True and a free "
        "decoder norm" in caplog.text
    )
    assert "gates stay open" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        # Under the unit-norm constraint the norm weights are all 1: nothing to warn about.
        build_gated_training_cfg(l1_scale_by_decoder_norm=True)
    assert caplog.text == ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        build_gated_training_cfg(unit_norm_decoder=False)
    assert "l1_scale_by_decoder_norm=False with unit_norm_decoder=False" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        build_gated_training_cfg()
        build_gated_training_cfg(recipe="april_update")
    assert caplog.text == ""


def test_wrong_d_in_is_a_clear_error():
    sae = GatedTrainingSAE(build_gated_training_cfg())
    with pytest.raises(ValueError, match=r"d_in=16.*shape \(8, 12\)"):
        sae.training_forward_pass(step_input(torch.randn(8, 12)))
    with pytest.raises(ValueError, match="d_in=16"):
        GatedSAE(GatedSAEConfig(d_in=16, d_sae=4)).encode(torch.randn(3, 5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_batch_is_a_clear_error(bad: float):
    sae = GatedTrainingSAE(build_gated_training_cfg())
    x = torch.randn(8, 16)
    x[3, 5] = bad
    with pytest.raises(NonFiniteBatchError, match="contains .* NaN and .* inf"):
        sae.training_forward_pass(step_input(x))


def _save_reference_outputs(path: Path, sae: SAE[Any]) -> None:
    x = torch.randn(30, sae.cfg.d_in) * 2
    with torch.no_grad():
        save_file(
            {"x": x, "features": sae.encode(x), "out": sae(x)},
            str(path / "expected.safetensors"),
        )


_LOAD_WITHOUT_PLUGIN = """
import sys
import torch
from safetensors.torch import load_file
from sae_lens import SAE, GatedSAE
sae = SAE.load_from_disk(sys.argv[1])
assert type(sae) is GatedSAE, type(sae)
expected = load_file(sys.argv[1] + "/expected.safetensors")
torch.testing.assert_close(sae.encode(expected["x"]), expected["features"], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(sae(expected["x"]), expected["out"], rtol=1e-5, atol=1e-5)
assert not any(name.startswith("sae_lens_gated") for name in sys.modules)
print("loaded-without-plugin")
"""


def test_saved_sae_loads_in_vanilla_saelens_without_the_plugin(tmp_path: Path):
    sae = GatedTrainingSAE(build_gated_training_cfg())
    randomize_gated_params(sae, seed=13, unit_decoder=True)
    training_dir, inference_dir = tmp_path / "training", tmp_path / "inference"
    sae.save_model(training_dir)
    sae.save_inference_model(inference_dir)
    for folder in (training_dir, inference_dir):
        _save_reference_outputs(folder, sae)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == "gated"
        result = subprocess.run(
            [sys.executable, "-c", _LOAD_WITHOUT_PLUGIN, str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "loaded-without-plugin" in result.stdout
    inference_cfg = json.loads((inference_dir / "cfg.json").read_text())
    details = inference_cfg["metadata"]["training_architecture_details"]
    assert details["recipe"] == "paper"
    assert details["unit_norm_decoder"] is True


def test_plugin_load_from_disk_returns_plugin_classes(tmp_path: Path):
    sae = GatedTrainingSAE(build_gated_training_cfg(recipe="april_update"))
    randomize_gated_params(sae, seed=14)
    sae.save_model(tmp_path / "ckpt")
    loaded = GatedTrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert type(loaded) is GatedTrainingSAE
    assert loaded.cfg == sae.cfg
    for name in GATED_PARAM_NAMES:
        torch.testing.assert_close(getattr(loaded, name), getattr(sae, name))
    sae.save_inference_model(tmp_path / "inference")
    inference = SAE.load_from_disk(tmp_path / "inference")
    assert type(inference) is GatedSAE
    x = torch.randn(10, 16)
    torch.testing.assert_close(inference(x), sae(x), rtol=1e-5, atol=1e-5)


def test_unit_norm_training_sae_loading_non_unit_weights_folds_norms(tmp_path: Path):
    april = GatedTrainingSAE(build_gated_training_cfg(recipe="april_update"))
    randomize_gated_params(april, seed=15)
    april.save_model(tmp_path / "april")
    cfg = json.loads((tmp_path / "april" / "cfg.json").read_text())
    cfg.update(
        recipe="paper",
        freeze_decoder_in_aux=True,
        l1_scale_by_decoder_norm=False,
        unit_norm_decoder=True,
        decoder_init_norm=1.0,
    )
    (tmp_path / "april" / "cfg.json").write_text(json.dumps(cfg))
    paper = GatedTrainingSAE.load_from_disk(tmp_path / "april")
    torch.testing.assert_close(
        paper.W_dec.norm(dim=1), torch.ones(48), atol=1e-6, rtol=0
    )
    x = torch.randn(20, 16)
    with torch.no_grad():
        torch.testing.assert_close(paper(x), april(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_step", ["never", "always"])
def test_a_training_step_over_the_scratch_budget_gives_the_one_chunk_step(
    monkeypatch: pytest.MonkeyPatch, sparse_step: str, device: str
):
    # No cache-sized chunks on the CPU: only the budget splits the batch, as off the CPU.
    monkeypatch.setattr(gated_sparse, "CPU_CHUNK_BYTES", 2**30)
    monkeypatch.setattr(
        "sae_lens_gated.saes.gated_function.SPARSE_CPU_CHUNK_BYTES", 2**30
    )
    cfg = build_gated_training_cfg(
        dtype="float64", sparse_step=sparse_step, device=device
    )
    sae = GatedTrainingSAE(cfg)
    randomize_gated_params(sae, seed=16, unit_decoder=True)
    x = torch.randn(200, 16, dtype=torch.float64).to(device)
    _open_a_fraction_of_gates(sae, x, 0.05)
    like = torch.empty(0, dtype=torch.float64, device=device)

    def step() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        out = sae.training_forward_pass(step_input(x, l1=0.4))
        assert out.feature_acts.is_sparse == (sparse_step == "always")
        return out.losses, _grads(sae, out.loss)

    assert len(gated_sparse.row_chunks(200, 48, like)) == 1
    losses, grads = step()
    # 50 float64 rows of 48 features per scratch buffer: the 200 rows in 4 chunks.
    monkeypatch.setattr(gated_sparse, "SCRATCH_BUDGET_BYTES", 50 * 48 * 8)
    assert len(gated_sparse.row_chunks(200, 48, like)) == 4
    split_losses, split_grads = step()
    assert split_losses.keys() == losses.keys()
    for name, value in losses.items():
        assert value.item() > 0, name
        torch.testing.assert_close(
            split_losses[name], value, rtol=1e-10, atol=0, msg=name
        )
    for name in GATED_PARAM_NAMES:
        assert grads[name].abs().max() > 0, name
        assert _rel_err(split_grads[name], grads[name]) <= 1e-10, name


def _open_a_fraction_of_gates(sae: Any, x: torch.Tensor, fraction: float) -> None:
    """Set ``b_gate`` so that about ``fraction`` of the gates are open on ``x``."""
    with torch.no_grad():
        centered = sae.process_sae_in(x)
        pre = centered @ sae.W_enc
        sae.b_gate.copy_(-torch.quantile(pre, 1 - fraction, dim=0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"recipe": "april_update"},
        {"weight_tying": "none"},
        {"apply_b_dec_to_input": False},
        {"aux_coefficient": 0.5, "freeze_decoder_in_aux": False},
    ],
)
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [("float64", 1e-10), ("float32", 1e-5)]
)
@pytest.mark.parametrize("device", DEVICES)
def test_a_sparse_step_gives_the_dense_step_losses_and_gradients(
    kwargs: dict[str, Any], dtype: str, tolerance: float, device: str
):
    if dtype == "float32":
        tolerance = float32_tolerance(device, tolerance)
    torch_dtype = getattr(torch, dtype)
    dense = GatedTrainingSAE(
        build_gated_training_cfg(
            dtype=dtype, sparse_step="never", device=device, **kwargs
        )
    )
    randomize_gated_params(dense, seed=8, unit_decoder=True)
    x = torch.randn(96, 16, dtype=torch_dtype).to(device)
    _open_a_fraction_of_gates(dense, x, 0.05)
    sparse = GatedTrainingSAE(
        build_gated_training_cfg(
            dtype=dtype, sparse_step="always", device=device, **kwargs
        )
    )
    copy_params(dense, sparse)

    out_dense = dense.training_forward_pass(step_input(x, l1=0.4))
    out_sparse = sparse.training_forward_pass(step_input(x, l1=0.4))
    # The sparse step really ran on the open gates: its activations are sparse tensors.
    assert out_sparse.feature_acts.is_sparse and not out_dense.feature_acts.is_sparse
    assert 0 < out_sparse.feature_acts._nnz() < 0.1 * x.shape[0] * 48
    torch.testing.assert_close(
        out_sparse.feature_acts.to_dense(),
        out_dense.feature_acts,
        rtol=0,
        atol=tolerance,
    )
    torch.testing.assert_close(
        out_sparse.sae_out, out_dense.sae_out, rtol=0, atol=tolerance
    )
    for name, value in out_dense.losses.items():
        assert _rel_err(out_sparse.losses[name], value) <= tolerance, name
    grads_dense = _grads(dense, out_dense.loss)
    grads_sparse = _grads(sparse, out_sparse.loss)
    for name in GATED_PARAM_NAMES:
        if getattr(dense, name).requires_grad:
            assert grads_dense[name].abs().max() > 0, name
        assert _rel_err(grads_sparse[name], grads_dense[name]) <= tolerance, name


def test_auto_tries_sparse_steps_once_few_gates_open_and_trains_alike():
    modes: list[bool] = []
    runs: dict[str, GatedTrainingSAE] = {}
    for setting in ("auto", "never"):
        torch.manual_seed(0)
        sae = GatedTrainingSAE(
            build_gated_training_cfg(
                dtype="float64",
                sparse_step=setting,
                l1_coefficient=3.0,
                resample_every=25,
                resample_window=25,
                resample_pool_size=512,
            )
        )
        if setting == "auto":
            forward = sae.training_forward_pass

            def spy(step_input: Any, forward: Any = forward) -> Any:
                out = forward(step_input)
                modes.append(out.feature_acts.is_sparse)
                return out

            sae.training_forward_pass = spy  # type: ignore[method-assign]
        data = SparseSyntheticData(d_in=16, seed=4)
        make_trainer(sae, (b.double() for b in data), steps=80).fit()
        runs[setting] = sae
    # Dense while many gates are open (the first step always); once few are, the policy
    # times sparse steps against dense ones (on this machine's clock), and may keep either.
    assert modes[0] is False and any(modes)
    first = modes.index(True)  # a probe: sparse warm-up, then timed steps alternating
    assert modes[first : first + 7] == [True, False, True, False, True, False, True]
    resampler = runs["auto"].conventions.resampler
    assert resampler is not None and resampler.n_events == 3
    for name, value in runs["never"].state_dict().items():
        torch.testing.assert_close(
            runs["auto"].state_dict()[name], value, rtol=0, atol=1e-9
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_per_example_errors_are_computed_in_slices_within_the_scratch_budget(
    device: str, normalize: str, monkeypatch: pytest.MonkeyPatch
):
    cfg = build_gated_training_cfg(normalize_activations=normalize, device=device)
    sae = GatedTrainingSAE(cfg)
    randomize_gated_params(sae, seed=8, unit_decoder=True)
    sae.to(device)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(8)).to(device)
    slices: list[int] = []
    encode_for_loss = sae.encode_for_loss

    def recording(part: torch.Tensor, **kwargs: Any) -> Any:
        slices.append(part.shape[0])
        return encode_for_loss(part, **kwargs)

    monkeypatch.setattr(sae, "encode_for_loss", recording)
    with torch.no_grad():
        whole = sae.per_example_reconstruction_error(x)  # 1 GiB: one slice
        assert slices == [200]
        if normalize == "none":  # by hand: the inference encoder and decoder
            by_hand = (x - sae.decode(sae.encode(x))).pow(2).sum(dim=-1)
            torch.testing.assert_close(whole, by_hand)
        # 30 rows of 48 float32 features per slice: 7 slices, the same errors.
        monkeypatch.setattr(gated_sparse, "SCRATCH_BUDGET_BYTES", 30 * 48 * 4)
        slices.clear()
        sliced = sae.per_example_reconstruction_error(x)
    assert slices == [30] * 6 + [20]
    assert whole.shape == (200,) and float(whole.min()) > 0
    torch.testing.assert_close(sliced, whole)
