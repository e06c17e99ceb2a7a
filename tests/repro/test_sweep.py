import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_gated.repro import experiments, sweep
from sae_lens_gated.repro.experiments import (
    BASELINE,
    MIXTURE,
    NO_AUX,
    PAPER,
    TRAINABLE_AUX,
    UNTIED,
)
from sae_lens_gated.repro.sweep import (
    SweepConfig,
    check_claims,
    format_claims,
    frontier_margins,
    run_sweep,
)
from tests.helpers import DEVICES, tiny_model, tiny_token_dataset


def _point(
    variant: str, l1: float, l0: float, ev: float, gamma: float
) -> dict[str, Any]:
    return {
        "variant": variant,
        "l1_coefficient": l1,
        "l0": l0,
        "explained_variance": ev,
        "relative_reconstruction_bias": gamma,
        "dead_fraction": 0.0,
        "ground_truth_mcc": None,
        "healthy": l0 >= 1 and ev >= 0.5,
    }


def test_frontier_margins_interpolate_in_log_l0():
    better = [_point(PAPER, 1, 4.0, 0.9, 1.0)]
    worse = [_point(BASELINE, 1, 2.0, 0.6, 0.8), _point(BASELINE, 0.5, 8.0, 0.8, 0.9)]
    (margin,) = frontier_margins(better, worse)
    # log 4 is halfway between log 2 and log 8: the baseline is at 0.7 there.
    assert margin["other_explained_variance"] == pytest.approx(0.7)
    assert margin["margin"] == pytest.approx(0.2)
    assert frontier_margins([_point(PAPER, 1, 20.0, 0.9, 1.0)], worse) == []


def test_claims_hold_or_fail_on_the_numbers():
    points = [
        _point(PAPER, 0.5, 8.0, 0.90, 1.004),
        _point(PAPER, 1.0, 4.0, 0.85, 0.995),
        _point(PAPER, 4.0, 0.01, 0.01, 0.7),  # unhealthy: ignored
        _point(BASELINE, 0.2, 16.0, 0.88, 0.90),
        _point(BASELINE, 0.5, 8.0, 0.80, 0.80),
        _point(BASELINE, 1.0, 2.0, 0.55, 0.60),
        _point(TRAINABLE_AUX, 0.5, 8.0, 0.88, 1.0),
        _point(TRAINABLE_AUX, 1.0, 2.0, 0.70, 1.0),
        _point(UNTIED, 0.5, 8.0, 0.91, 1.0),
        _point(UNTIED, 1.0, 2.0, 0.70, 1.0),
        _point(NO_AUX, 0.5, 0.2, 0.1, 0.9),
        _point(MIXTURE, 0.5, 32.0, 0.75, 1.0),
        _point(MIXTURE, 2.0, 2.0, 0.55, 1.0),
    ]
    claims = check_claims(points)
    assert claims["gated_gamma_near_1"]["holds"]
    assert claims["baseline_gamma_shrinks"]["holds"]
    assert claims["gated_beats_wider_baseline"]["holds"]
    assert claims["gated_beats_wider_baseline"]["mean_margin"] == pytest.approx(
        ((0.90 - 0.80) + (0.85 - (0.55 + 0.25 * 0.5))) / 2
    )
    assert claims["frozen_aux_decoder_helps"]["holds"]
    # untied is better at L0=8 (0.91 vs 0.90) and worse at L0=4: mean margin decides.
    assert claims["untied_encoders_do_not_help"]["holds"]
    assert claims["no_aux_loss_closes_the_gates"]["holds"]
    # The mixture at L0 8 and 4, interpolated in log L0 between L0 2 and 32: 0.55 + 0.2 * t.
    assert claims["discouraged_mixture_hurts"]["holds"]
    assert claims["discouraged_mixture_hurts"]["mean_margin"] == pytest.approx(
        ((0.90 - (0.55 + 0.2 * 0.5)) + (0.85 - (0.55 + 0.2 * 0.25))) / 2
    )

    points[0]["relative_reconstruction_bias"] = 1.05
    points[4]["relative_reconstruction_bias"] = (
        0.95  # baseline gamma no longer decreasing
    )
    points[6]["explained_variance"] = 0.95  # ablation above the paper recipe at L0=8
    for mixture in points[11:]:  # the mixture now above the paper recipe everywhere
        mixture["explained_variance"] = 0.95
    claims = check_claims(points)
    assert not claims["gated_gamma_near_1"]["holds"]
    assert not claims["baseline_gamma_shrinks"]["holds"]
    assert not claims["frozen_aux_decoder_helps"]["holds"]
    assert not claims["discouraged_mixture_hurts"]["holds"]
    text = format_claims({"points": points, "claims": claims, "config": {"out": "x"}})
    assert "gated_gamma_near_1: DOES NOT HOLD" in text


def test_quick_sweep_writes_results_claims_and_plots(tmp_path: Path):
    cfg = SweepConfig(
        out=tmp_path / "sweep",
        quick=True,
        steps=60,
        eval_samples=4_000,
        variants=(PAPER, BASELINE, NO_AUX),
    )
    results = run_sweep(cfg, progress=False)
    stored = json.loads((cfg.out / "results.json").read_text())
    assert stored["claims"] == json.loads(json.dumps(results["claims"]))
    assert len(stored["runs"]) == 4 + 5 + 2  # the quick lambda grids
    assert {r["seed"] for r in stored["runs"]} == {0}
    assert stored["config"]["steps"] == 60 and stored["config"]["seeds"] == [0]
    assert stored["config"]["synthetic_model"]["seed"] == 0
    for run in stored["runs"]:
        assert run["ground_truth_mcc"] is not None
        assert math.isfinite(run["l0"]) and run["l0"] >= 0
        assert sum(run["magnitude_histogram"]) > 0 or run["l0"] == 0
    assert {p["variant"] for p in stored["points"]} == {PAPER, BASELINE, NO_AUX}
    for name in ("pareto.png", "gamma_vs_lambda.png", "activation_magnitudes.png"):
        assert (cfg.out / name).stat().st_size > 10_000


@pytest.mark.parametrize("device", DEVICES)
def test_a_quick_synthetic_sweep_on_each_device(tmp_path: Path, device: str):
    cfg = SweepConfig(
        out=tmp_path / "sweep",
        quick=True,
        steps=40,
        eval_samples=2_000,
        variants=(PAPER,),
        device=device,
    )
    runs = run_sweep(cfg, progress=False)["runs"]
    assert len(runs) == 4 and {r["variant"] for r in runs} == {PAPER}
    # Sparser with more lambda (L0 about 50 at the least, 6 at the most on the CPU).
    l0s = [r["l0"] for r in sorted(runs, key=lambda r: r["l1_coefficient"])]
    assert all(math.isfinite(v) for v in l0s) and l0s[0] > 3 * l0s[-1]
    assert all(0 < r["ground_truth_mcc"] <= 1 for r in runs)
    assert (
        json.loads((cfg.out / "results.json").read_text())["config"]["device"] == device
    )


@pytest.mark.parametrize("device", DEVICES)
def test_sweep_runs_on_language_model_activations(tmp_path: Path, device: str):
    cfg = SweepConfig(
        out=tmp_path / "lm",
        quick=True,
        steps=10,
        batch_size=64,
        variants=(PAPER,),
        model="tiny-random",
        hook="blocks.0.hook_resid_post",
        context_size=16,
        expansion=2.0,
        device=device,
    )
    results = run_sweep(
        cfg,
        override_model=tiny_model().to(device),
        override_dataset=tiny_token_dataset(),
        progress=False,
    )
    assert len(results["runs"]) == 4
    assert all(
        r["d_sae"] == 64 and r["ground_truth_mcc"] is None for r in results["runs"]
    )
    assert all(math.isfinite(r["l0"]) for r in results["runs"])
    assert results["config"]["synthetic_model"] is None
    assert (cfg.out / "pareto.png").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"variants": ("gated (imaginary)",)}, "Unknown variant"),
        ({"variants": ()}, "variants needs at least one name"),
        ({"model": "gpt2"}, "both --model and --hook"),
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"eval_samples": -1}, "eval_samples must be at least 1"),
        ({"seeds": ()}, "seeds needs at least one value"),
        ({"l1": ()}, "l1 needs at least one value"),
        ({"l1": (0.5, -1.0)}, "l1 must be finite and at least 0, got -1.0"),
        ({"l1": (float("nan"),)}, "l1 must be finite and at least 0, got nan"),
        ({"lr": 0.0}, "lr must be a finite number above 0"),
        ({"device": "cuda:x"}, "Unknown device 'cuda:x'"),
    ],
)
def test_sweep_config_rejects_bad_input(settings: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        SweepConfig(**settings)


def test_sweep_refuses_a_non_empty_out_folder_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "results.json").write_text("earlier results")

    def no_training(*_: Any, **__: Any) -> Any:
        raise AssertionError("training started")

    monkeypatch.setattr(sweep, "make_source", no_training)
    with pytest.raises(FileExistsError, match="overwrite"):
        run_sweep(SweepConfig(out=tmp_path))
    assert (tmp_path / "results.json").read_text() == "earlier results"
    with pytest.raises(AssertionError, match="training started"):
        run_sweep(SweepConfig(out=tmp_path, overwrite=True))


def test_a_language_model_sweep_trains_each_seed_from_one_activation_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = tiny_model()
    forward_passes: list[int] = []
    run_with_cache = model.run_with_cache

    def counted(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        forward_passes.append(tokens.shape[0])
        return run_with_cache(tokens, *args, **kwargs)

    model.run_with_cache = counted  # type: ignore[method-assign]
    started: list[dict[str, dict[str, torch.Tensor]]] = []
    passes_per_run: list[int] = []

    class Runner(experiments.MultiSAETrainingRunner):
        def __init__(self, cfg: Any, **kwargs: Any) -> None:
            started.append(
                {
                    name: {k: v.clone() for k, v in sae.state_dict().items()}
                    for name, sae in kwargs["override_saes"].items()
                }
            )
            super().__init__(cfg, **kwargs)

        def run(self) -> Any:
            before = len(forward_passes)
            saes = super().run()
            passes_per_run.append(len(forward_passes) - before)
            return saes

    monkeypatch.setattr(experiments, "MultiSAETrainingRunner", Runner)
    cfg = SweepConfig(
        out=tmp_path / "lm",
        quick=True,
        steps=20,
        batch_size=64,
        variants=(PAPER, BASELINE),
        seeds=(0, 1),
        l1=(0.1, 3.0),
        model="tiny-random",
        hook="blocks.0.hook_resid_post",
        context_size=16,
        expansion=2.0,
    )
    results = run_sweep(
        cfg, override_model=model, override_dataset=tiny_token_dataset(), progress=False
    )
    # One runner per seed, training all 4 SAEs of that seed.
    assert [len(s) for s in started] == [4, 4]
    runs = results["runs"]
    assert len(runs) == 8
    # Each SAE starts from the weights it would start from alone: the same for both
    # lambdas of a variant and seed, different between seeds.
    for seed_saes in started:
        paper = [s for name, s in seed_saes.items() if name.startswith(PAPER)]
        assert len(paper) == 2
        for key, value in paper[0].items():
            assert torch.equal(paper[1][key], value), key
    first = next(iter(started[0].values()))
    second = next(iter(started[1].values()))
    assert not torch.equal(first["W_dec"], second["W_dec"])
    # The model ran as often for 4 SAEs as for one.
    one = dataclasses.replace(
        cfg, out=tmp_path / "one", variants=(PAPER,), seeds=(0,), l1=(0.1,)
    )
    run_sweep(
        one, override_model=model, override_dataset=tiny_token_dataset(), progress=False
    )
    assert passes_per_run[0] == passes_per_run[1] == passes_per_run[2] > 0
    for variant in (PAPER, BASELINE):
        l0 = {r["l1_coefficient"]: r["l0"] for r in runs if r["variant"] == variant}
        assert l0[3.0] < l0[0.1], variant  # a higher lambda, a sparser SAE
    assert all(r["seconds"] > 0 for r in runs)
    seconds = {(r["seed"], r["seconds"]) for r in runs}
    assert len(seconds) == 2  # an equal share of each seed's run
