"""Convert a gated SAE into the SAELens JumpReLU SAE that computes the same features.

Run as a script:

    python examples/convert_to_jumprelu.py SRC OUT [--folder FOLDER]

SRC is anything `load_gated_sae` accepts (a local folder, a SAELens release, a Hugging Face
repo id). The JumpReLU SAE is saved to OUT, loadable by vanilla SAELens as "jumprelu"; the
script prints the largest feature difference between the two on random inputs.
"""

import argparse
from pathlib import Path

import torch
from sae_lens import SAE

from sae_lens_gated import load_gated_sae, to_jumprelu


def convert(source: str, out: str | Path, folder: str | None = None) -> float:
    """Save the JumpReLU equivalent of a gated SAE; return the max feature difference."""
    gated = load_gated_sae(source, folder)
    to_jumprelu(gated).save_model(out)
    jumprelu = SAE.load_from_disk(out)
    x = torch.randn(1000, gated.cfg.d_in) * 2
    with torch.no_grad():
        return float((jumprelu.encode(x) - gated.encode(x)).abs().max())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    difference = convert(args.source, args.out, args.folder)
    print(
        f"Saved a JumpReLU SAE to {args.out}; max feature difference {difference:.2e}"
    )
