"""Time ``sae-lens-gated sweep --quick`` on a language model's activations, offline.

The model is a random 4-layer TransformerLens model (d_model 256) built from a config and the
dataset random token ids in memory, so no hub is needed; the SAEs read the last layer. Prints
the sweep's claims and, last, a JSON line with the wall time and the number of SAEs trained.

    python scripts/time_lm_sweep.py OUT_DIR
"""

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_gated.repro.sweep import SweepConfig, format_claims, run_sweep


def main(out: Path) -> None:
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=4,
            d_model=256,
            n_ctx=64,
            d_head=64,
            n_heads=4,
            d_mlp=1024,
            d_vocab=1024,
            act_fn="gelu",
            normalization_type="LN",
            device="cpu",
            seed=0,
        )
    )
    tokens = torch.randint(
        0, 1024, (20000, 64), generator=torch.Generator().manual_seed(0)
    )
    cfg = SweepConfig(
        out=out,
        quick=True,
        steps=150,
        batch_size=1024,
        model="random",
        hook="blocks.3.hook_resid_post",
        context_size=64,
        expansion=4.0,
    )
    start = time.perf_counter()
    results = run_sweep(
        cfg,
        override_model=model,
        override_dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
        progress=False,
    )
    seconds = time.perf_counter() - start
    sys.stdout.write(format_claims(results) + "\n")
    sys.stdout.write(
        json.dumps({"seconds": seconds, "saes": len(results["runs"])}) + "\n"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/time_lm_sweep.py OUT_DIR")
    main(Path(sys.argv[1]))
