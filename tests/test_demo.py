import json
from pathlib import Path

import torch
from sae_lens import SAE

from sae_lens_gated import GatedSAE, relative_reconstruction_bias
from sae_lens_gated.demo import DemoConfig, format_table, run_demo


def test_demo_trains_an_unbiased_gated_sae_and_saves_it(tmp_path: Path):
    cfg = DemoConfig(out=tmp_path / "demo", steps=400, eval_samples=20_000)
    row = run_demo(cfg)

    assert 0.97 <= row.relative_reconstruction_bias <= 1.03
    assert row.explained_variance > 0.6
    assert 0 < row.l0 < 30
    assert 0 <= row.dead_features < cfg.d_sae
    assert 0.3 < row.ground_truth_mcc <= 1.0
    assert 4.0 < row.true_l0 < 4.7

    sae = SAE.load_from_disk(cfg.out)
    assert type(sae) is GatedSAE
    torch.testing.assert_close(
        sae.W_dec.norm(dim=1), torch.ones(cfg.d_sae), atol=1e-5, rtol=0
    )
    results = json.loads((cfg.out / "demo_results.json").read_text())
    assert results["results"][0]["l0"] == row.l0
    assert results["config"]["synthetic_model"]["num_features"] == 256

    # The reported gamma is reproducible from the saved SAE on fresh samples.
    from sae_lens.synthetic import SyntheticModel

    model = SyntheticModel(cfg.synthetic_model)
    x = model.feature_dict(model.activation_generator.sample(20_000))
    with torch.no_grad():
        gamma = relative_reconstruction_bias(x, sae(x))
    assert abs(gamma - row.relative_reconstruction_bias) < 0.01

    table = format_table([row])
    assert "gated (paper recipe)" in table
    assert f"{row.relative_reconstruction_bias:.3f}" in table
