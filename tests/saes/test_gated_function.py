import dataclasses
from typing import Any, NamedTuple

import pytest
import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE as BuiltinGatedTrainingSAE
from sae_lens.saes.gated_sae import (
    GatedTrainingSAEConfig as BuiltinGatedTrainingSAEConfig,
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import override

import sae_lens_gated.saes.gated_function as gated_function
import sae_lens_gated.saes.gated_sparse as gated_sparse
from sae_lens_gated import GatedSAE, GatedSAEConfig, GatedTrainingSAE
from sae_lens_gated.saes.gated_function import (
    GatedFunctionOptions,
    GatedOutputs,
    GatedSAEFunction,
    gated_sae_function,
)
from tests.helpers import (
    DEVICES,
    GATED_PARAM_NAMES,
    build_gated_training_cfg,
    copy_params,
    float32_tolerance,
    randomize_gated_params,
    reference_paper_losses,
    step_input,
)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"recipe": "april_update"},
        {"weight_tying": "none"},
        {"apply_b_dec_to_input": False, "freeze_decoder_in_aux": False},
    ],
)
def test_chunked_function_matches_the_plain_reference(
    kwargs: dict[str, Any], device: str
):
    like = torch.empty(1, dtype=torch.float64, device=device)
    assert len(gated_sparse.row_chunks(200, 48, like)) == 4
    cfg = build_gated_training_cfg(dtype="float64", device=device, **kwargs)
    sae = GatedTrainingSAE(cfg)
    randomize_gated_params(sae, seed=21, unit_decoder=bool(cfg.unit_norm_decoder))
    if cfg.weight_tying == "none":
        with torch.no_grad():
            sae.r_mag.zero_()
    x = torch.randn(200, 16, dtype=torch.float64).to(device)
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
@pytest.mark.parametrize("device", DEVICES)
def test_input_gradient_matches_autograd(device: str):
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48, dtype="float64", device=device))
    randomize_gated_params(sae, seed=22)
    x = torch.randn(200, 16, dtype=torch.float64).to(device).requires_grad_(True)
    (grad,) = torch.autograd.grad(sae.encode(x).pow(2).sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    centered = x_ref - sae.b_dec
    pre = centered @ sae.W_enc
    f = (pre + sae.b_gate > 0) * torch.relu(pre * sae.r_mag.exp() + sae.b_mag)
    (grad_ref,) = torch.autograd.grad(f.pow(2).sum(), x_ref)
    assert grad_ref.abs().max() > 0
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_stays_close_to_float32(device: str):
    sae = GatedTrainingSAE(build_gated_training_cfg(device=device))
    randomize_gated_params(sae, seed=24, unit_decoder=True)
    x = torch.randn(64, 16).to(device)
    exact = sae.training_forward_pass(step_input(x))
    exact_grads = torch.autograd.grad(exact.loss, list(sae.parameters()))
    with torch.autocast(device, dtype=torch.bfloat16):
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_step", ["never", "always"])
def test_compiled_training_step_matches_eager(sparse_step: str, device: str):
    cfg = build_gated_training_cfg(sparse_step=sparse_step, device=device)
    eager = GatedTrainingSAE(cfg)
    randomize_gated_params(eager, seed=25, unit_decoder=True)
    compiled_sae = GatedTrainingSAE(cfg)
    copy_params(eager, compiled_sae)
    x = torch.randn(32, 16).to(device)
    compiled = torch.compile(compiled_sae.training_forward_pass, backend="aot_eager")
    eager.training_forward_pass(step_input(x)).loss.backward()
    compiled(step_input(x)).loss.backward()
    rtol, atol = float32_tolerance(device, 1e-5), float32_tolerance(device, 1e-6)
    for a, b in zip(eager.parameters(), compiled_sae.parameters()):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("recipe", ["paper", "april_update"])
def test_compiled_bf16_step_in_row_chunks_matches_eager(
    monkeypatch: pytest.MonkeyPatch, recipe: str
):
    # The bf16 weight-gradient products over 4 chunks of 8 rows, summed in float32
    # through a reused buffer, traced and compiled. (On the CPU only: the GPU check's
    # compile step has a tight time limit, and the ops are the same on CUDA.)
    for module, name in (
        (gated_sparse, "CPU_CHUNK_BYTES"),
        (gated_sparse, "SCRATCH_BUDGET_BYTES"),
    ):
        monkeypatch.setattr(module, name, 8 * 48 * 2)
    cfg = build_gated_training_cfg(sparse_step="never", recipe=recipe)
    eager = GatedTrainingSAE(cfg)
    randomize_gated_params(eager, seed=26, unit_decoder=True)
    compiled_sae = GatedTrainingSAE(cfg)
    copy_params(eager, compiled_sae)
    x = torch.randn(32, 16)
    assert len(gated_sparse.row_chunks(32, 48, x.bfloat16())) == 4
    compiled = torch.compile(compiled_sae.training_forward_pass, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_loss = eager.training_forward_pass(step_input(x)).loss
        compiled_loss = compiled(step_input(x)).loss
    eager_loss.backward()
    compiled_loss.backward()
    for a, b in zip(eager.parameters(), compiled_sae.parameters()):
        assert a.grad is not None and b.grad is not None and a.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ---- sparse mode: the same numbers as the dense mode, computed on the open gates ----

N_ROWS, D_IN, D_SAE = 200, 16, 48


class _Params(NamedTuple):
    W_enc: torch.Tensor
    b_gate: torch.Tensor
    r_mag: torch.Tensor | None
    b_mag: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor

    def leaves(self) -> dict[str, torch.Tensor]:
        """Fresh leaf copies that require gradients, by name (``r_mag`` if present)."""
        return {
            name: value.detach().clone().requires_grad_(True)
            for name, value in self._asdict().items()
            if value is not None
        }

    def call(
        self,
        x: torch.Tensor,
        weights: torch.Tensor | None,
        options: GatedFunctionOptions,
    ) -> GatedOutputs:
        return gated_sae_function(x, *self, weights, options)


def _function_inputs(
    seed: int,
    dtype: torch.dtype,
    density: float,
    r_mag: bool = True,
    device: str = "cpu",
) -> tuple[torch.Tensor, _Params]:
    """A batch and parameters whose gate bias opens about ``density`` of the gates, on
    ``device`` (drawn on the CPU: the same numbers on every device)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        values = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return values.to(dtype)

    x = randn(N_ROWS, D_IN, scale=1.0)
    W_enc, b_dec = randn(D_IN, D_SAE, scale=0.3), randn(D_IN, scale=0.2)
    pre = (x - b_dec) @ W_enc
    if density == 0:
        b_gate = pre.max(dim=0).values.neg() - 1
    else:
        # Per feature, the gate opens on the rows above the (1 - density) quantile; the
        # threshold lies halfway between two rows, so that rounding cannot flip a gate.
        k = min(N_ROWS - 1, max(1, round((1 - density) * N_ROWS)))
        ordered = pre.sort(dim=0).values
        b_gate = -(ordered[k - 1] + ordered[k]) / 2
    log_scale = randn(D_SAE, scale=0.3) if r_mag else None
    b_mag = randn(D_SAE, scale=0.2)
    params = _Params(
        W_enc=W_enc.to(device),
        b_gate=b_gate.to(device),
        r_mag=None if log_scale is None else log_scale.to(device),
        b_mag=b_mag.to(device),
        W_dec=randn(D_SAE, D_IN, scale=0.3).to(device),
        b_dec=b_dec.to(device),
    )
    return x.to(device), params


def _loss_and_grads(
    x: torch.Tensor,
    params: _Params,
    options: GatedFunctionOptions,
    weighted: bool,
) -> tuple[GatedOutputs, dict[str, torch.Tensor]]:
    """The training loss as gated_sae.py builds it, plus terms on f, g and pi_mag at the
    open gates, and the gradients of every input.

    Without ``options.decode_bias``, ``b_dec`` is added to the returned parts here, as a
    latent-sharded SAE adds it to the sum of its shards' parts.
    """
    x = x.clone().requires_grad_(True)
    leaves = params.leaves()
    weights = leaves["W_dec"].norm(dim=1) if weighted else None
    out = params._replace(**leaves).call(x, weights, options)
    assert out.reconstruction is not None and out.aux_reconstruction is not None
    reconstruction, aux_reconstruction = out.reconstruction, out.aux_reconstruction
    if not options.decode_bias:
        b_dec = leaves["b_dec"]
        b_aux = b_dec if options.aux_decoder_trainable else b_dec.detach()
        reconstruction, aux_reconstruction = (
            reconstruction + b_dec,
            aux_reconstruction + b_aux,
        )
        out = out._replace(
            reconstruction=reconstruction, aux_reconstruction=aux_reconstruction
        )
    open_gates = out.gate_acts > 0
    magnitude_at_open = out.magnitude if options.sparse else out.magnitude * open_gates
    loss = (
        (reconstruction - x).pow(2).sum(-1).mean()
        + 0.4 * out.penalty / N_ROWS
        + (aux_reconstruction - x).pow(2).sum(-1).mean()
        + 0.01 * (out.feature_acts.pow(3).sum() + out.gate_acts.sin().sum())
        + 0.02 * magnitude_at_open.pow(2).sum()
    )
    grads = torch.autograd.grad(loss, [x, *leaves.values()])
    return out, dict(zip(["sae_in", *leaves], grads))


def _dense_layout(out: GatedOutputs, values: torch.Tensor) -> torch.Tensor:
    assert out.support is not None
    return out.support.to_sparse_coo(values).to_dense()


RECIPES = {
    "paper": ({"center": True, "aux_decoder_trainable": False}, False, True),
    "april_update": ({"center": True, "aux_decoder_trainable": True}, True, True),
    "no_r_mag": ({"center": True, "aux_decoder_trainable": False}, False, False),
    "uncentered": ({"center": False, "aux_decoder_trainable": True}, True, True),
}


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 0.97])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)]
)
def test_sparse_mode_matches_the_dense_mode(
    recipe: str, density: float, dtype: torch.dtype, tol: float, device: str
):
    if dtype == torch.float32:
        tol = float32_tolerance(device, tol)
    kwargs, weighted, r_mag = RECIPES[recipe]
    x, params = _function_inputs(31, dtype, density, r_mag=r_mag, device=device)
    dense_options = GatedFunctionOptions(decode=True, count_open=True, **kwargs)
    sparse_options = GatedFunctionOptions(decode=True, sparse=True, **kwargs)
    dense, dense_grads = _loss_and_grads(x, params, dense_options, weighted)
    sparse, sparse_grads = _loss_and_grads(x, params, sparse_options, weighted)

    # The sparse outputs are values at exactly the open gates, row-major.
    assert sparse.support is not None and dense.support is None
    open_positions = torch.nonzero(dense.gate_acts > 0).T
    torch.testing.assert_close(sparse.support.indices, open_positions, rtol=0, atol=0)
    n_open = open_positions.shape[1]
    assert sparse.feature_acts.shape == (n_open,)
    assert int(sparse.n_open) == int(dense.n_open) == n_open  # type: ignore[arg-type]
    if density == 0:
        assert n_open == 0
    elif density < 0.1:
        assert (
            (dense.gate_acts > 0).any(dim=1).logical_not().any()
        )  # a row with no open gate
    elif density > 0.9:
        assert n_open > 0.9 * N_ROWS * D_SAE

    def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
        # Relative to each tensor's scale: summation order differs between the modes.
        got, want = got.detach(), want.detach()
        scale = float(want.abs().max().clamp_min(1))
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=name)

    close(_dense_layout(sparse, sparse.feature_acts), dense.feature_acts, "f")
    close(_dense_layout(sparse, sparse.gate_acts), dense.gate_acts, "g")
    open_magnitude = dense.magnitude * (dense.gate_acts > 0)
    close(_dense_layout(sparse, sparse.magnitude), open_magnitude, "pi_mag")
    for name in ("penalty", "reconstruction", "aux_reconstruction"):
        close(getattr(sparse, name), getattr(dense, name), name)
    assert sparse_grads.keys() == dense_grads.keys()
    for name, want in dense_grads.items():
        if density > 0 or name in ("b_dec", "sae_in"):
            assert want.abs().max() > 0, name  # every gradient is exercised
        close(sparse_grads[name], want, name)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("sparse", [False, True])
def test_parts_without_decode_bias_plus_b_dec_equal_the_whole(
    recipe: str, sparse: bool, device: str
):
    # decode_bias=False returns f @ W_dec and g @ W_dec, and b_dec's gradient without the
    # decoder's part (a latent shard's share): adding b_dec outside gives back the
    # ordinary outputs and gradients.
    kwargs, weighted, r_mag = RECIPES[recipe]
    x, params = _function_inputs(5, torch.float64, 0.05, r_mag=r_mag, device=device)
    whole_options = GatedFunctionOptions(decode=True, sparse=sparse, **kwargs)
    parts_options = dataclasses.replace(whole_options, decode_bias=False)
    whole, grads = _loss_and_grads(x, params, whole_options, weighted)
    parts, part_grads = _loss_and_grads(x, params, parts_options, weighted)
    assert params.b_dec.abs().min() > 0
    for name in ("reconstruction", "aux_reconstruction", "penalty"):
        torch.testing.assert_close(
            getattr(parts, name), getattr(whole, name), rtol=0, atol=1e-12, msg=name
        )
    assert grads.keys() == part_grads.keys()
    for name, want in grads.items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(part_grads[name], want, rtol=0, atol=1e-10, msg=name)
    # The parts themselves lack b_dec.
    raw = params.call(x, None, parts_options).reconstruction
    assert raw is not None and whole.reconstruction is not None
    torch.testing.assert_close(
        raw, whole.reconstruction.detach() - params.b_dec, rtol=0, atol=1e-12
    )


@pytest.mark.usefixtures("small_chunks")
def test_sparse_backward_runs_on_the_open_gates(monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []
    sampled_dot = gated_sparse.FeatureMajor.sampled_dot

    def spy(self: gated_sparse.FeatureMajor, *args: torch.Tensor) -> torch.Tensor:
        result = sampled_dot(self, *args)
        calls.append(result.shape[0])
        return result

    monkeypatch.setattr(gated_sparse.FeatureMajor, "sampled_dot", spy)
    x, params = _function_inputs(32, torch.float64, 0.05)
    options = GatedFunctionOptions(center=True, decode=True, sparse=True)
    out, _ = _loss_and_grads(x, params, options, weighted=False)
    # One sampled product per reconstruction, each of nnz values.
    assert calls == [out.feature_acts.shape[0]] * 2
    assert 0 < calls[0] < 0.1 * N_ROWS * D_SAE


def _largest_tensor_made(run: Any) -> int:
    """The most elements of any tensor a torch function returns while ``run`` runs
    (forward and backward)."""
    largest = 0

    class Record(TorchFunctionMode):
        def __torch_function__(
            self,
            func: Any,
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            nonlocal largest
            result = func(*args, **(kwargs or {}))
            for value in result if isinstance(result, tuple) else (result,):
                if isinstance(value, torch.Tensor) and not value.is_sparse:
                    largest = max(largest, value.numel())
            return result

    with Record():
        run()
    return largest


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
def test_sparse_mode_makes_no_batch_by_d_sae_tensor(sparse: bool, device: str):
    x, params = _function_inputs(33, torch.float64, 0.05, device=device)
    options = GatedFunctionOptions(
        center=True, decode=True, aux_decoder_trainable=True, sparse=sparse
    )
    largest = _largest_tensor_made(
        lambda: _loss_and_grads(x, params, options, weighted=True)
    )
    if sparse:  # the chunk scratch buffers (64 rows) or the (batch, d_in) tensors
        assert largest == max(64 * D_SAE, N_ROWS * D_IN)
    else:
        assert largest == N_ROWS * D_SAE


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("device", DEVICES)
def test_dense_mode_counts_the_open_gates(device: str):
    x, params = _function_inputs(34, torch.float64, 0.3, device=device)
    plain = params.call(x, None, GatedFunctionOptions(center=True, decode=True))
    counted_options = GatedFunctionOptions(center=True, decode=True, count_open=True)
    counted = params.call(x, None, counted_options)
    assert plain.n_open is None and counted.n_open is not None
    assert counted.n_open.dtype == torch.long and counted.n_open.shape == ()
    assert int(counted.n_open) == int((counted.gate_acts > 0).sum())
    assert 0.25 < int(counted.n_open) / (N_ROWS * D_SAE) < 0.35
    torch.testing.assert_close(plain.reconstruction, counted.reconstruction)
    raw = GatedSAEFunction.apply(x, *params, None, counted_options)
    assert len(raw) == 7  # f, g, pi_mag, penalty, x_hat, x_aux, n_open


def test_incompatible_options_are_rejected():
    with pytest.raises(ValueError, match="features_only"):
        GatedFunctionOptions(center=True, decode=False, features_only=True, sparse=True)
    with pytest.raises(ValueError, match="features_only"):
        x, params = _function_inputs(36, torch.float64, 0.3)
        options = GatedFunctionOptions(center=True, decode=False, features_only=True)
        params.call(x, None, options)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sparse_step_matches_eager(device: str):
    import torch._dynamo

    x, params = _function_inputs(35, torch.float32, 0.05, device=device)
    leaves = params.leaves()
    params = params._replace(**leaves)

    def step(sparse: bool) -> torch.Tensor:
        options = GatedFunctionOptions(
            center=True, decode=True, sparse=sparse, count_open=True
        )
        out = params.call(x, params.W_dec.norm(dim=1), options)
        assert out.reconstruction is not None and out.aux_reconstruction is not None
        return (
            (out.reconstruction - x).pow(2).sum(-1).mean()
            + out.penalty / x.shape[0]
            + (out.aux_reconstruction - x).pow(2).sum(-1).mean()
        )

    # The dense mode traces whole; the sparse mode breaks the graph only to run the
    # function itself eagerly (counted once per inlined frame).
    assert torch._dynamo.explain(step)(False).graph_break_count == 0
    reasons = torch._dynamo.explain(step)(True).break_reasons
    assert len(reasons) == 1 and "torch.compiler.disable" in reasons[0].reason
    eager_loss = step(True)
    eager = torch.autograd.grad(eager_loss, list(leaves.values()))
    compiled_loss = torch.compile(step, backend="aot_eager")(True)
    compiled = torch.autograd.grad(compiled_loss, list(leaves.values()))
    loss_rtol = float32_tolerance(device, 1e-6)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=loss_rtol, atol=0)
    rtol, atol = float32_tolerance(device, 1e-5), float32_tolerance(device, 1e-6)
    for got, want in zip(compiled, eager):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.usefixtures("small_chunks")
def test_sparse_feature_acts_give_saelens_trainer_statistics():
    # What SAETrainer (sae-lens >= 6.50) computes from feature_acts, for a sparse COO.
    x, params = _function_inputs(37, torch.float64, 0.1)
    params = params._replace(b_mag=params.b_mag - 2)  # pi_mag <= 0 at some open gates
    dense = params.call(x, None, GatedFunctionOptions(center=True, decode=True))
    options = GatedFunctionOptions(center=True, decode=True, sparse=True)
    sparse = params.call(x, None, options)
    assert sparse.support is not None
    coo = sparse.support.to_sparse_coo(sparse.feature_acts.detach())
    # Open gates with f = 0 must not count as firing.
    assert (sparse.feature_acts == 0).any() and (sparse.feature_acts > 0).any()
    got, want = _trainer_statistics(coo), _trainer_statistics(dense.feature_acts)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert 0 < int(want[0].sum()) < D_SAE


@torch.no_grad()
def _trainer_statistics(
    feature_acts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """did_fire, L0 and firing counts, computed as SAETrainer computes them."""
    firing = feature_acts.bool().float()
    did_fire = firing.sum(-2).bool()
    did_fire = did_fire.to_dense() if did_fire.is_sparse else did_fire
    l0 = feature_acts.bool().float().sum(-1).to_dense().mean()
    freq = torch.zeros(feature_acts.shape[1], dtype=torch.float64)
    freq += firing.sum(0)
    return did_fire, l0, freq


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("chunks", [1, 4])
def test_bf16_autocast_in_row_chunks_stays_close_to_float32(
    monkeypatch: pytest.MonkeyPatch, chunks: int, sparse: bool, device: str
):
    # One chunk: each weight gradient's first bf16 product widened, W_dec's second (the
    # trainable aux decoder's) added in blocks. 64-row chunks: every product but the
    # first added chunk by chunk to a float32 sum.
    rows = N_ROWS if chunks == 1 else 64
    for module, name in (
        (gated_sparse, "CPU_CHUNK_BYTES"),
        (gated_function, "SPARSE_CPU_CHUNK_BYTES"),
        (gated_sparse, "SCRATCH_BUDGET_BYTES"),
    ):
        monkeypatch.setattr(module, name, rows * D_SAE * 2)
    like = torch.empty(1, dtype=torch.bfloat16, device=device)
    assert len(gated_sparse.row_chunks(N_ROWS, D_SAE, like)) == chunks
    x, params = _function_inputs(38, torch.float32, 0.1, device=device)
    options = GatedFunctionOptions(
        center=True, decode=True, aux_decoder_trainable=True, sparse=sparse
    )
    _, exact_grads = _loss_and_grads(x, params, options, weighted=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed, mixed_grads = _loss_and_grads(x, params, options, weighted=True)
    assert mixed.feature_acts.dtype == mixed.reconstruction.dtype == torch.bfloat16  # type: ignore[union-attr]
    for name, want in exact_grads.items():
        got = mixed_grads[name]
        assert got.dtype == torch.float32, name
        # In the parameter's layout: autograd would copy another once more.
        like = x if name == "sae_in" else getattr(params, name)
        assert got.stride() == like.stride(), name
        assert float((got - want).norm() / want.norm()) < 5e-2, name


@pytest.mark.parametrize("device", DEVICES)
def test_a_gradient_is_handed_to_autograd_in_its_parameters_dtype_and_layout(
    monkeypatch: pytest.MonkeyPatch, device: str
):
    # The sparse mode's bf16 W_enc gradient is a transpose of a feature-major product; on
    # the CPU it is transposed in blocks of 3 features (the last holds 1) in its own dtype
    # and each block widened, which must give exactly the one transposing copy's numbers.
    monkeypatch.setattr(gated_function, "TRANSPOSE_BLOCK_BYTES", 3 * 24 * 2)
    param = torch.empty(24, 40, device=device)
    feature_major = torch.randn(40, 24, device=device)
    for grad in (feature_major.t(), feature_major.to(torch.bfloat16).t()):
        got = gated_function._laid_out_as(grad, param)
        assert got.dtype == param.dtype and got.stride() == param.stride()
        assert torch.equal(got, grad.to(param.dtype))
    same_layout = torch.randn(24, 40, device=device, dtype=torch.bfloat16)
    got = gated_function._laid_out_as(same_layout, param)
    assert got.stride() == param.stride()
    assert torch.equal(got, same_layout.float())
    own = torch.randn(24, 40, device=device)
    assert (
        gated_function._laid_out_as(own, param) is own
    )  # no copy where none is needed


# aten ops that multiply or gather over the batch, and what they read.
_BATCH_PRODUCTS = {
    "mm",
    "addmm",
    "addmm_",
    "mv",
    "_embedding_bag",
    "_embedding_bag_forward_only",
}


class _RecordOps(TorchDispatchMode):
    """Runs every aten op, after showing it to :meth:`record`."""

    def record(self, name: str, args: tuple[Any, ...]) -> None:
        raise NotImplementedError

    @override
    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.record(func.overloadpacket.__name__, args)
        return func(*args, **(kwargs or {}))


class _RecordProducts(_RecordOps):
    """Records the floating-point operands' dtypes of every batch product."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, set[torch.dtype]]] = []

    @override
    def record(self, name: str, args: tuple[Any, ...]) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        # Over the batch: an operand with N_ROWS rows, or N_ROWS + 1 row offsets.
        if name in _BATCH_PRODUCTS and any(
            N_ROWS in t.shape or N_ROWS + 1 in t.shape for t in tensors
        ):
            dtypes = {t.dtype for t in tensors if t.is_floating_point()}
            self.calls.append((name, dtypes))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
def test_bf16_autocast_multiplies_and_gathers_the_batch_in_bf16(
    sparse: bool, device: str
):
    # As autocast runs a standard SAE's matmuls, weight gradients included: a float32
    # product is 5x slower on a CPU with AMX, and more on a GPU's tensor cores. (The
    # sparse mode's sampled products stay float32: sampled_addmm takes no bf16.)
    x, params = _function_inputs(40, torch.float32, 0.1, device=device)
    options = GatedFunctionOptions(
        center=True, decode=True, aux_decoder_trainable=True, sparse=sparse
    )
    record = _RecordProducts()
    with torch.autocast(device, dtype=torch.bfloat16), record:
        _loss_and_grads(x, params, options, weighted=True)
    names = [name for name, _ in record.calls]
    if sparse:
        # Two decodes; the gradients of W_enc, of W_dec (twice) and of the input.
        assert sum(name.startswith("_embedding_bag") for name in names) == 6
    else:
        # Encoder and two decoders; two projections back, the weight and input gradients.
        assert sum(name in ("mm", "addmm") for name in names) == 9
    assert all(dtypes == {torch.bfloat16} for _, dtypes in record.calls), record.calls


class _RecordCasts(_RecordOps):
    """Counts the casts of float32 tensors, by shape."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[int, ...], int] = {}

    @override
    def record(self, name: str, args: tuple[Any, ...]) -> None:
        source = args[0] if args else None
        if (
            name == "_to_copy"
            and isinstance(source, torch.Tensor)
            and source.dtype == torch.float32
        ):
            shape = tuple(source.shape)
            self.counts[shape] = self.counts.get(shape, 0) + 1


@pytest.mark.parametrize("sparse_step", ["never", "always"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_a_bf16_step_casts_each_weight_once(input_grad: bool, sparse_step: str):
    # In the forward; the dense backward reuses the decoder's cast, and casts W_enc again
    # only for the input's gradient, which training never asks for.
    sae = GatedTrainingSAE(build_gated_training_cfg(sparse_step=sparse_step))
    x = torch.randn(64, 16).requires_grad_(input_grad)
    casts = _RecordCasts()
    with torch.autocast("cpu", dtype=torch.bfloat16), casts:
        sae.training_forward_pass(step_input(x)).loss.backward()
    assert casts.counts[tuple(sae.W_enc.shape)] == (2 if input_grad else 1)
    assert casts.counts[tuple(sae.W_dec.shape)] == 1
    assert (x.grad is not None) is input_grad


def test_bf16_products_over_chunks_are_summed_in_float32_in_blocks(
    monkeypatch: pytest.MonkeyPatch,
):
    # Blocks of 50 rows (or columns) of 16 bf16 values: 4 blocks of each product below.
    monkeypatch.setattr(gated_sparse, "SCRATCH_BUDGET_BYTES", 50 * 16 * 2)
    gen = torch.Generator().manual_seed(41)
    chunks = [
        (torch.randn(k, 16, generator=gen), torch.randn(k, 200, generator=gen))
        for k in (60, 60, 30)
    ]
    like = torch.empty(1, dtype=torch.bfloat16)
    assert len(gated_sparse.row_chunks(200, 16, like)) == 4
    sums = gated_function._ProductSums(torch.float32, one_chunk=False)
    want_enc = torch.zeros(16, 200, dtype=torch.float64)
    want_dec = torch.zeros(200, 16, dtype=torch.float64)
    for x, grad in chunks:
        x, grad = x.bfloat16(), grad.bfloat16()
        sums.add("enc", x.T, grad)  # (16, 200): blocks of columns
        sums.add("dec", grad.T, x)  # (200, 16): blocks of rows
        want_enc += x.T.double() @ grad.double()
        want_dec += grad.T.double() @ x.double()
    for got, want in (
        (sums.total("enc", want_enc), want_enc),
        (sums.total("dec", want_dec), want_dec),
    ):
        assert got.dtype == torch.float32
        # Each chunk's product is rounded to bf16 once (relative 2**-9); a lost block
        # or chunk would be off by far more.
        error = (got.double() - want).abs().max() / want.abs().max()
        assert float(error) < 2**-7
    # One block's product at a time went through the reused buffer.
    assert sums._buffer is not None and sums._buffer.numel() == 50 * 16


# ---- the scratch budget: a batch split into chunks gives the one-chunk numbers ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
def test_a_batch_over_the_scratch_budget_gives_the_one_chunk_results(
    monkeypatch: pytest.MonkeyPatch, sparse: bool, device: str
):
    chunk_counts: list[int] = []

    def counting_row_chunks(*args: Any, **kwargs: Any) -> list[slice]:
        chunks = gated_sparse.row_chunks(*args, **kwargs)
        chunk_counts.append(len(chunks))
        return chunks

    monkeypatch.setattr(gated_function, "row_chunks", counting_row_chunks)
    # No cache-sized chunks on the CPU: only the budget splits the batch, as off the CPU.
    monkeypatch.setattr(gated_sparse, "CPU_CHUNK_BYTES", 2**30)
    monkeypatch.setattr(gated_function, "SPARSE_CPU_CHUNK_BYTES", 2**30)
    x, params = _function_inputs(39, torch.float64, 0.3, device=device)
    options = GatedFunctionOptions(
        center=True,
        decode=True,
        aux_decoder_trainable=True,
        sparse=sparse,
        count_open=True,
    )
    features_only = GatedFunctionOptions(center=True, decode=False, features_only=True)

    def run() -> tuple[GatedOutputs, dict[str, torch.Tensor], torch.Tensor]:
        out, grads = _loss_and_grads(x, params, options, weighted=True)
        with torch.no_grad():
            features = GatedSAEFunction.apply(x, *params, None, features_only)
        assert isinstance(features, torch.Tensor)
        return out, grads, features

    whole, whole_grads, whole_features = run()
    # Forward (and dense backward), then the features-only forward: one chunk each.
    assert chunk_counts == [1] * len(chunk_counts) and len(chunk_counts) == (
        2 if sparse else 3
    )
    # 50 float64 rows of 48 features per scratch buffer: the 200 rows in 4 chunks.
    monkeypatch.setattr(gated_sparse, "SCRATCH_BUDGET_BYTES", 50 * D_SAE * 8)
    chunk_counts.clear()
    split, split_grads, split_features = run()
    assert chunk_counts == [4] * len(chunk_counts) and len(chunk_counts) == (
        2 if sparse else 3
    )

    def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
        # Only the order of the per-chunk sums differs.
        got, want = got.detach(), want.detach()
        scale = float(want.abs().max().clamp_min(1))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * scale, msg=name)

    assert int(whole.n_open) == int(split.n_open) > 0  # type: ignore[arg-type]
    if sparse:
        assert whole.support is not None and split.support is not None
        assert torch.equal(split.support.indices, whole.support.indices)
    for name in GatedOutputs._fields[:6]:
        close(getattr(split, name), getattr(whole, name), name)
    close(split_features, whole_features, "features_only")
    for name, want in whole_grads.items():
        assert want.abs().max() > 0, name
        close(split_grads[name], want, name)
