"""Attach a gated SAE to a HookedSAETransformer: read its features and the spliced-in loss.

Run as a script (downloads Pythia-70M and a SAEBench gated SAE):

    python examples/hooked_sae_transformer.py "The capital of France is Paris."

`inspect()` takes an already-loaded model and SAE, so it also runs offline.
"""

import argparse
from typing import Any

import torch
from sae_lens import SAE, HookedSAETransformer

from sae_lens_gated import load_gated_sae


def inspect(
    model: HookedSAETransformer, sae: SAE[Any], tokens: torch.Tensor
) -> dict[str, Any]:
    """Feature activations at every position, and the next-token loss with and without the SAE.

    Args:
        model: The model the SAE belongs to.
        sae: A gated SAE whose ``cfg.metadata.hook_name`` is a hook of ``model``.
        tokens: Token ids of shape ``(batch, positions)``.
    """
    hook = sae.cfg.metadata.hook_name
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    features = cache[f"{hook}.hook_sae_acts_post"]
    clean_loss = model(tokens, return_type="loss")
    spliced_loss = model.run_with_saes(tokens, saes=[sae], return_type="loss")
    assert isinstance(clean_loss, torch.Tensor) and isinstance(
        spliced_loss, torch.Tensor
    )
    strongest = features[0].max(dim=0)
    top = strongest.values.topk(5)
    return {
        "features": features,
        "top_features": top.indices.tolist(),
        "top_activations": top.values.tolist(),
        "clean_loss": float(clean_loss),
        "spliced_loss": float(spliced_loss),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="The capital of France is Paris.")
    args = parser.parse_args()
    sae = load_gated_sae(
        "sae_bench_pythia70m_sweep_gated_ctx128_0730",
        "blocks.3.hook_resid_post__trainer_0",
    )
    model = HookedSAETransformer.from_pretrained_no_processing(
        "EleutherAI/pythia-70m-deduped"
    )
    result = inspect(model, sae, model.to_tokens(args.prompt))
    print(f"strongest features: {result['top_features']} ({result['top_activations']})")
    print(
        f"next-token loss: {result['clean_loss']:.3f} clean, {result['spliced_loss']:.3f} with the SAE"
    )
