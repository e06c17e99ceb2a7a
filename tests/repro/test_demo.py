import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE

from sae_lens_gated import GatedSAE, relative_reconstruction_bias
from sae_lens_gated.repro import demo
from sae_lens_gated.repro.demo import DemoConfig, format_table, run_demo
from sae_lens_gated.repro.experiments import BASELINE, PAPER, SyntheticSource
from tests.helpers import tiny_model, tiny_token_dataset


def test_demo_shows_gated_unbiased_and_the_baseline_shrinking(tmp_path: Path):
    cfg = DemoConfig(
        out=tmp_path / "demo",
        steps=400,
        eval_samples=20_000,
        gated_l1=(1.0,),
        baseline_l1=(1.0,),
    )
    runs = run_demo(cfg)
    gated, baseline = runs
    assert (gated.variant, baseline.variant) == (PAPER, BASELINE)
    assert (gated.d_sae, baseline.d_sae) == (256, 384)
    assert 0.97 <= gated.relative_reconstruction_bias <= 1.03
    assert baseline.relative_reconstruction_bias < 0.95
    assert gated.explained_variance > 0.6 and 0 < gated.l0 < 30
    assert gated.ground_truth_mcc is not None and 0.3 < gated.ground_truth_mcc <= 1

    sae = SAE.load_from_disk(cfg.out)
    assert type(sae) is GatedSAE
    torch.testing.assert_close(
        sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5, rtol=0
    )
    source = SyntheticSource(cfg.synthetic_model, 20_000)
    with torch.no_grad():
        gamma = relative_reconstruction_bias(source.eval_x, sae(source.eval_x))
    assert gamma == pytest.approx(gated.relative_reconstruction_bias, abs=1e-4)

    results = json.loads((cfg.out / "demo_results.json").read_text())
    assert [r["variant"] for r in results["results"]] == [PAPER, BASELINE]
    assert results["config"]["synthetic_model"]["num_features"] == 256
    assert (cfg.out / "demo.png").stat().st_size > 10_000
    table = format_table(runs)
    assert f"{gated.relative_reconstruction_bias:.3f}" in table and BASELINE in table


def test_demo_runs_on_language_model_activations(tmp_path: Path):
    cfg = DemoConfig(
        out=tmp_path / "lm",
        steps=20,
        batch_size=64,
        gated_l1=(0.5,),
        baseline_l1=(0.2,),
        model="tiny-random",
        hook="blocks.1.hook_resid_post",
        context_size=16,
        expansion=4.0,
    )
    runs = run_demo(
        cfg, override_model=tiny_model(), override_dataset=tiny_token_dataset()
    )
    assert [r.d_sae for r in runs] == [128, 192]  # 4x and 1.5 x 4x the hook width (32)
    assert all(r.ground_truth_mcc is None for r in runs)
    assert all(r.mse > 0 for r in runs)
    loaded = SAE.load_from_disk(cfg.out)
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"steps": -3}, "steps must be at least 1, got -3"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"eval_samples": 0}, "eval_samples must be at least 1"),
        ({"gated_l1": ()}, "gated_l1 needs at least one value"),
        ({"gated_l1": (-0.5,)}, "gated_l1 must be finite and at least 0, got -0.5"),
        ({"baseline_l1": (float("nan"),)}, "baseline_l1 must be finite and at least 0"),
        ({"baseline_l1": (float("inf"),)}, "got inf"),
        ({"lr": -1e-3}, "lr must be a finite number above 0"),
        ({"gated_width": 0}, "gated_width must be at least 1"),
        ({"device": "foo"}, "Unknown device 'foo'"),
        ({"hook": "blocks.0.hook_resid_post"}, "both --model and --hook"),
    ],
)
def test_demo_config_rejects_bad_input(settings: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        DemoConfig(**settings)


def test_demo_refuses_a_saved_sae_folder_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "cfg.json").write_text('{"d_in": 5}')

    def no_training(*_: Any, **__: Any) -> Any:
        raise AssertionError("training started")

    monkeypatch.setattr(demo, "make_source", no_training)
    with pytest.raises(FileExistsError, match="overwrite"):
        run_demo(DemoConfig(out=saved))
    with pytest.raises(NotADirectoryError, match="is a file"):
        run_demo(DemoConfig(out=saved / "cfg.json", overwrite=True))
    assert (saved / "cfg.json").read_text() == '{"d_in": 5}'
    with pytest.raises(AssertionError, match="training started"):
        run_demo(DemoConfig(out=saved, overwrite=True))
