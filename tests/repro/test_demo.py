import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from sae_lens_gated import GatedSAE, relative_reconstruction_bias
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
