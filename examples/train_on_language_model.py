"""Train a paper-recipe Gated SAE on a language model's activations with SAELens's runner.

Run as a script (downloads GPT-2 and a tokenized dataset from the Hugging Face hub):

    python examples/train_on_language_model.py --training-tokens 2000000

`train()` takes `override_model` / `override_dataset` so it can run offline on any
HookedTransformer and token dataset (the test suite uses a tiny random model).
"""

import argparse
from typing import Any

from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

import sae_lens_gated

sae_lens_gated.register()  # already done on import; explicit for readers


def train(
    model_name: str = "gpt2",
    hook_name: str = "blocks.8.hook_resid_pre",
    d_in: int = 768,
    d_sae: int = 16384,
    dataset_path: str = "apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
    training_tokens: int = 2_000_000,
    context_size: int = 128,
    train_batch_size_tokens: int = 4096,
    output_path: str = "gated-gpt2",
    override_model: Any = None,
    override_dataset: Any = None,
    **runner_overrides: Any,
) -> Any:
    cfg = LanguageModelSAERunnerConfig.from_dict(
        {
            "sae": {
                "architecture": "gated",
                "recipe": "paper",
                "d_in": d_in,
                "d_sae": d_sae,
                "l1_coefficient": 1.0,
                "l1_warm_up_steps": 1000,
            },
            "model_name": model_name,
            "hook_name": hook_name,
            "dataset_path": dataset_path,
            "context_size": context_size,
            "training_tokens": training_tokens,
            "train_batch_size_tokens": train_batch_size_tokens,
            "n_batches_in_buffer": max(64, 2 * train_batch_size_tokens // context_size),
            "adam_beta1": 0.0,  # paper App. D.1
            "adam_beta2": 0.999,
            "lr": 3e-4,
            "lr_warm_up_steps": 1000,
            "output_path": output_path,
            "logger": {"log_to_wandb": False},
            **runner_overrides,
        }
    )
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=override_model, override_dataset=override_dataset
    )
    return runner.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--training-tokens", type=int, default=2_000_000)
    parser.add_argument("--output-path", default="gated-gpt2")
    args = parser.parse_args()
    sae = train(training_tokens=args.training_tokens, output_path=args.output_path)
    print(
        f"Saved a {type(sae).__name__} with d_sae={sae.cfg.d_sae} to {args.output_path}"
    )
