"""Every script in examples/ runs offline, with tiny random models and local files."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer, JumpReLUSAE
from sae_lens.saes.sae import SAEMetadata

from sae_lens_gated import GatedSAE, GatedSAEConfig
from tests.helpers import (
    load_module,
    randomize_gated_params,
    tiny_model,
    tiny_token_dataset,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HOOK = "blocks.0.hook_resid_post"


def _load(name: str) -> ModuleType:
    return load_module(EXAMPLES / f"{name}.py")


def _with_path(folder: str) -> str:
    """``folder`` first on the Python path, then whatever the caller's path holds."""
    return os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)


def _tiny_sae_model() -> HookedSAETransformer:
    return tiny_model(HookedSAETransformer)


def _metadata() -> SAEMetadata:
    return SAEMetadata(
        hook_name=HOOK, model_name="tiny-random", context_size=16, prepend_bos=False
    )


def _exact_gated_sae() -> GatedSAE:
    """A gated SAE that reconstructs exactly: features relu(x) and relu(-x), decoder +-I."""
    sae = GatedSAE(GatedSAEConfig(d_in=32, d_sae=64, metadata=_metadata()))
    eye = torch.eye(32)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        for name in ("b_dec", "b_gate", "b_mag", "r_mag"):
            getattr(sae, name).zero_()
    return sae


def test_train_on_language_model_example(tmp_path: Path):
    example = _load("train_on_language_model")
    sae = example.train(
        model_name="tiny-random",
        hook_name="blocks.1.hook_resid_post",
        d_in=32,
        d_sae=64,
        dataset_path="",
        training_tokens=64 * 30,
        context_size=16,
        train_batch_size_tokens=64,
        output_path=str(tmp_path / "out"),
        override_model=tiny_model(),
        override_dataset=tiny_token_dataset(),
        streaming=False,
        prepend_bos=False,
        store_batch_size_prompts=8,
        n_eval_batches=1,
        checkpoint_path=str(tmp_path / "ckpt"),
    )
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert type(loaded) is GatedSAE
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    torch.testing.assert_close(
        loaded.W_dec.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0
    )
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)


def test_load_and_evaluate_example_scores_an_exact_sae_as_perfect(tmp_path: Path):
    _exact_gated_sae().save_model(tmp_path / "sae")
    metrics = _load("load_and_evaluate_saebench").load_and_evaluate(
        str(tmp_path / "sae"),
        None,
        model=tiny_model(),
        dataset=tiny_token_dataset(),
        n_batches=2,
        batch_size_prompts=4,
    )
    performance = metrics["model_performance_preservation"]
    assert performance["ce_loss_with_sae"] == pytest.approx(
        performance["ce_loss_without_sae"], rel=1e-4
    )
    assert metrics["reconstruction_quality"]["explained_variance"] == pytest.approx(
        1.0, abs=1e-4
    )
    assert metrics["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(
        1.0, abs=1e-4
    )
    assert metrics["sparsity"]["l0"] == pytest.approx(
        32.0, abs=0.5
    )  # one of +-x per dim


def test_convert_to_jumprelu_example(tmp_path: Path):
    sae = GatedSAE(GatedSAEConfig(d_in=32, d_sae=64, metadata=_metadata()))
    randomize_gated_params(sae, seed=41)
    sae.save_model(tmp_path / "gated")
    difference = _load("convert_to_jumprelu").convert(
        str(tmp_path / "gated"), tmp_path / "jr"
    )
    assert difference < 1e-5
    assert type(SAE.load_from_disk(tmp_path / "jr")) is JumpReLUSAE


def test_convert_to_jumprelu_example_never_overwrites_a_saved_sae(tmp_path: Path):
    sae = GatedSAE(GatedSAEConfig(d_in=32, d_sae=64, metadata=_metadata()))
    randomize_gated_params(sae, seed=43)
    sae.save_model(tmp_path / "gated")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "gated").iterdir()}
    with pytest.raises(FileExistsError, match="Refusing to write to"):
        _load("convert_to_jumprelu").convert(
            str(tmp_path / "gated"), tmp_path / "gated"
        )
    assert {p.name: p.read_bytes() for p in (tmp_path / "gated").iterdir()} == saved


def test_hooked_sae_transformer_example_reads_features_and_spliced_loss():
    model = _tiny_sae_model()
    sae = GatedSAE(GatedSAEConfig(d_in=32, d_sae=64, metadata=_metadata()))
    randomize_gated_params(sae, seed=42)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    example = _load("hooked_sae_transformer")
    result: dict[str, Any] = example.inspect(model, sae, tokens)

    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    with torch.no_grad():
        expected = sae.encode(cache[HOOK])
        spliced = model.run_with_hooks(
            tokens,
            return_type="loss",
            fwd_hooks=[(HOOK, lambda act, hook: sae(act))],  # noqa: ARG005
        )
    torch.testing.assert_close(result["features"], expected, rtol=1e-5, atol=1e-6)
    assert result["spliced_loss"] == pytest.approx(float(spliced), rel=1e-5)
    assert result["spliced_loss"] != pytest.approx(result["clean_loss"], rel=1e-3)
    assert (
        result["top_features"] == expected[0].max(dim=0).values.topk(5).indices.tolist()
    )

    exact = example.inspect(model, _exact_gated_sae(), tokens)
    assert exact["spliced_loss"] == pytest.approx(exact["clean_loss"], rel=1e-4)


_DISTRIBUTED_ARGS = [
    "--steps",
    "40",
    "--batch-size",
    "256",
    "--d-sae",
    "256",
    "--l1",
    "3",
    "--lr",
    "3e-2",
    "--dtype",
    "float64",  # float32 rounding grows under Adam; float64 shows the runs are the same
]


def _distributed_example(rank: int, mode: str, out: str) -> Any:
    del rank
    return _load("train_distributed").main(
        ["--mode", mode, "--out", out, *_DISTRIBUTED_ARGS]
    )


def test_train_distributed_example_gives_the_same_sae_on_one_and_two_processes(
    tmp_path: Path,
):
    from safetensors.torch import load_file

    from tests.distributed.spawn import run_on_ranks

    runs: dict[str, Path] = {}
    for mode in ("data", "latent"):
        for world in (1, 2):
            runs[f"{mode}-{world}"] = out = tmp_path / f"{mode}-{world}"
            summary = run_on_ranks(
                _distributed_example, mode, str(out), world_size=world
            )[0]
            assert summary["processes"] == world
            assert summary["resampled"] > 0  # a resampling event rewrote features
    # The script as torchrun launches it.
    runs["torchrun"] = tmp_path / "torchrun"
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(EXAMPLES / "train_distributed.py"),
            "--mode",
            "latent",
            "--out",
            str(runs["torchrun"]),
            *_DISTRIBUTED_ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # Keep the caller's path: on the GPU machine the wheels are found through it. No
        # GPU: two processes there would both want the one GPU for NCCL.
        env={
            **os.environ,
            "PYTHONPATH": _with_path(str(EXAMPLES.parent)),
            "CUDA_VISIBLE_DEVICES": "",
        },
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert json.loads(launched.stdout.strip().splitlines()[-1])["processes"] == 2

    reference = load_file(runs["data-1"] / "sae_weights.safetensors")
    assert reference["W_enc"].shape == (64, 256)
    for name, folder in runs.items():
        weights = load_file(folder / "sae_weights.safetensors")
        for key, value in reference.items():
            torch.testing.assert_close(
                weights[key], value, rtol=0, atol=1e-10, msg=f"{name}: {key}"
            )


def test_train_distributed_example_refuses_a_non_empty_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "sae_weights.safetensors").write_text("a saved SAE")
    with pytest.raises(SystemExit) as exit_info:
        _load("train_distributed").main(
            ["--mode", "data", "--steps", "5", "--out", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "sae_weights.safetensors").read_text() == "a saved SAE"
