"""Convert a gated SAE into the SAELens JumpReLU SAE that computes the same features.

The same features up to float rounding at the threshold: an input exactly at a threshold
can go either way in float32, so the two can differ there.

Run as a script:

    python examples/convert_to_jumprelu.py SRC OUT [--folder FOLDER]

SRC is anything `load_gated_sae` accepts (a local folder, a SAELens release, a Hugging Face
repo id). The JumpReLU SAE is saved to the new folder OUT (an existing non-empty folder is
refused, never overwritten), loadable by vanilla SAELens as "jumprelu"; the script prints
the largest feature difference between the two on random inputs.
"""

import argparse
import sys
from pathlib import Path

import torch
from sae_lens import SAE

from sae_lens_gated import GatedSAEExportError, GatedSAELoadError, load_gated_sae
from sae_lens_gated.conversion import check_new_folder, export_sae


def convert(source: str, out: str | Path, folder: str | None = None) -> float:
    """Save the JumpReLU equivalent of a gated SAE; return the max feature difference."""
    check_new_folder(out)  # before a possibly long download
    gated = load_gated_sae(source, folder)
    export_sae(gated, out, "jumprelu")
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
    try:
        difference = convert(args.source, args.out, args.folder)
    except (GatedSAELoadError, GatedSAEExportError, OSError) as error:
        sys.exit(f"error: {error}")
    print(
        f"Saved a JumpReLU SAE to {args.out}; max feature difference {difference:.2e}"
    )
