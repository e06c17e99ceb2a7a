"""Load a published SAEBench gated SAE (Pythia-70M) and evaluate it with SAELens's evals.

Run as a script (downloads the SAE, the model and a dataset from the Hugging Face hub):

    python examples/load_and_evaluate_saebench.py

`load_and_evaluate()` takes any source `load_gated_sae` accepts and an already-loaded
model and dataset, so it also runs offline (the test suite uses local files and a tiny
random model).
"""

import argparse
import json
from typing import Any

from sae_lens import ActivationsStore, HookedSAETransformer
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler

from sae_lens_gated import load_gated_sae


def load_and_evaluate(
    source: str = "sae_bench_pythia70m_sweep_gated_ctx128_0730",
    folder: str = "blocks.3.hook_resid_post__trainer_0",
    model: Any = None,
    dataset: Any = "NeelNanda/pile-10k",
    n_batches: int = 8,
    batch_size_prompts: int = 8,
) -> dict[str, Any]:
    """Evaluate a gated SAE spliced into its model: CE loss recovered, L0, variance, gamma.

    Args:
        source: A SAELens release, a Hugging Face repo id or a local folder.
        folder: The SAE id in the release, or the folder in the repo.
        model: The model the SAE was trained on (default: loaded from its metadata).
        dataset: A dataset name or an in-memory dataset with a ``tokens`` column.
        n_batches: Evaluation batches.
        batch_size_prompts: Prompts per batch.
    """
    sae = load_gated_sae(source, folder)
    if model is None:
        model = HookedSAETransformer.from_pretrained_no_processing(
            f"EleutherAI/{sae.cfg.metadata.model_name}"
        )
    context_size = sae.cfg.metadata.context_size or 128
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=dataset,
        context_size=context_size,
        streaming=isinstance(dataset, str),
        store_batch_size_prompts=batch_size_prompts,
        train_batch_size_tokens=batch_size_prompts * context_size,
        n_batches_in_buffer=2,
    )
    metrics, _ = run_evals(
        sae,
        store,
        model,
        ActivationScaler(),
        EvalConfig(
            batch_size_prompts=batch_size_prompts,
            n_eval_reconstruction_batches=n_batches,
            n_eval_sparsity_variance_batches=n_batches,
            compute_ce_loss=True,
            compute_l2_norms=True,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
        ),
        exclude_special_tokens=False,
    )
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--source", default="sae_bench_pythia70m_sweep_gated_ctx128_0730"
    )
    parser.add_argument("--folder", default="blocks.3.hook_resid_post__trainer_0")
    args = parser.parse_args()
    results = load_and_evaluate(args.source, args.folder)
    print(json.dumps(results, indent=2, default=str))
