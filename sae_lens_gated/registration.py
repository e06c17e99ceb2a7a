"""Make ``architecture="gated"`` in SAELens resolve to this plugin's classes, reversibly.

SAELens's ``register_sae_class`` refuses names that already exist, so the plugin replaces
the ``"gated"`` entries of its registries directly, remembering the exact built-in entries
so :func:`unregister` can put them back. Both registries are replaced: the training one
decides what runners train, and the inference one what ``SAE.load_from_disk`` and
``SAE.from_pretrained`` build. The plugin's classes subclass the built-in ones and save in
the built-in format, so nothing that expects the built-in classes breaks.
"""

import logging
from typing import Any

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_lens_gated.saes.gated_sae import (
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
)
from sae_lens_gated.saes.gated_untied_sae import ARCHITECTURE as UNTIED_ARCHITECTURE
from sae_lens_gated.saes.gated_untied_sae import (
    GatedUntiedSAE,
    GatedUntiedSAEConfig,
    GatedUntiedTrainingSAE,
    GatedUntiedTrainingSAEConfig,
)

logger = logging.getLogger(__name__)

ARCHITECTURE = "gated"

# architecture -> (inference entry, training entry)
_PLUGIN_ENTRIES: dict[str, tuple[tuple[Any, Any], tuple[Any, Any]]] = {
    ARCHITECTURE: (
        (GatedSAE, GatedSAEConfig),
        (GatedTrainingSAE, GatedTrainingSAEConfig),
    ),
    UNTIED_ARCHITECTURE: (
        (GatedUntiedSAE, GatedUntiedSAEConfig),
        (GatedUntiedTrainingSAE, GatedUntiedTrainingSAEConfig),
    ),
}

# The entries that were registered before register() replaced them (None: there was none).
_replaced: dict[str, tuple[Any, Any]] = {}


def is_registered() -> bool:
    """Whether ``"gated"`` (and ``"gated_untied"``) resolve to this plugin in SAELens."""
    return all(
        SAE_CLASS_REGISTRY.get(name) == inference
        and SAE_TRAINING_CLASS_REGISTRY.get(name) == training
        for name, (inference, training) in _PLUGIN_ENTRIES.items()
    )


def register() -> None:
    """Make ``architecture="gated"`` train and load this plugin's Gated SAE. Idempotent.

    Also registers ``"gated_untied"``, the paper's untied-encoders ablation.
    """
    if is_registered():
        return
    for name, (inference, training) in _PLUGIN_ENTRIES.items():
        if name not in _replaced:
            _replaced[name] = (
                SAE_CLASS_REGISTRY.get(name),
                SAE_TRAINING_CLASS_REGISTRY.get(name),
            )
        SAE_CLASS_REGISTRY[name] = inference
        SAE_TRAINING_CLASS_REGISTRY[name] = training
    logger.info(
        "sae_lens_gated: architecture %r now trains the paper's Gated SAE "
        "(sae_lens_gated.unregister() restores SAELens's built-in).",
        ARCHITECTURE,
    )


def unregister() -> None:
    """Restore the exact registry entries :func:`register` replaced. Idempotent."""
    for name in list(_replaced):
        for registry, previous in zip(
            (SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY), _replaced.pop(name)
        ):
            if previous is None:
                registry.pop(name, None)
            else:
                registry[name] = previous
