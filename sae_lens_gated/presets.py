"""Training settings of the paper, expressed as SAELens runner config fields."""

from typing import Any


def paper_runner_overrides() -> dict[str, Any]:
    """``LanguageModelSAERunnerConfig`` fields set as in the paper (App. D.1).

    - ``adam_beta1=0.0``, ``adam_beta2=0.999``: "following Templeton et al. (2024)".
    - ``lr=3e-4``: the learning rate of all gated runs (and the GELU-1L baseline).
    - ``lr_warm_up_steps=1000``, ``lr_scheduler_name="constant"``, ``lr_decay_steps=0``:
      the paper uses "a learning rate warm-up" without giving its length; 1000 linear steps
      and a constant rate afterwards follow the authors' first public replication
      (dictionary_learning's ``GatedSAETrainer``).
    - ``train_batch_size_tokens=4096``: the paper's batch size.

    Training length (300k-400k steps, about 1.2-1.6B tokens in the paper) is left to you.
    The paper recipe and resampling are the defaults of
    :class:`~sae_lens_gated.GatedTrainingSAEConfig`. Gradient clipping is not a runner field:
    SAELens's trainer always clips to 1.0, and the plugin keeps that by default because it
    helped short runs; set ``clip_grad_norm=False`` on the SAE config to train unclipped, as
    the paper does. SAELens's coefficient warm-up of lambda (``l1_warm_up_steps``) is not
    part of the paper and stays 0.

    Example: ``LanguageModelSAERunnerConfig(sae=..., **paper_runner_overrides(), ...)``.
    """
    return {
        "adam_beta1": 0.0,
        "adam_beta2": 0.999,
        "lr": 3e-4,
        "lr_warm_up_steps": 1000,
        "lr_scheduler_name": "constant",
        "lr_decay_steps": 0,
        "train_batch_size_tokens": 4096,
    }
