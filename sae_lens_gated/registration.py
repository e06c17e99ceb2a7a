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

logger = logging.getLogger(__name__)

ARCHITECTURE = "gated"

_PLUGIN_INFERENCE_ENTRY = (GatedSAE, GatedSAEConfig)
_PLUGIN_TRAINING_ENTRY = (GatedTrainingSAE, GatedTrainingSAEConfig)

# The entries that were registered before register() replaced them (None: there was none).
_replaced: dict[str, Any] = {}


def is_registered() -> bool:
    """Whether ``"gated"`` currently resolves to this plugin in both SAELens registries."""
    return (
        SAE_CLASS_REGISTRY.get(ARCHITECTURE) == _PLUGIN_INFERENCE_ENTRY
        and SAE_TRAINING_CLASS_REGISTRY.get(ARCHITECTURE) == _PLUGIN_TRAINING_ENTRY
    )


def register() -> None:
    """Make ``architecture="gated"`` train and load this plugin's Gated SAE. Idempotent."""
    if is_registered():
        return
    _replaced["inference"] = SAE_CLASS_REGISTRY.get(ARCHITECTURE)
    _replaced["training"] = SAE_TRAINING_CLASS_REGISTRY.get(ARCHITECTURE)
    SAE_CLASS_REGISTRY[ARCHITECTURE] = _PLUGIN_INFERENCE_ENTRY
    SAE_TRAINING_CLASS_REGISTRY[ARCHITECTURE] = _PLUGIN_TRAINING_ENTRY
    logger.info(
        "sae_lens_gated: architecture %r now trains the paper's Gated SAE "
        "(sae_lens_gated.unregister() restores SAELens's built-in).",
        ARCHITECTURE,
    )


def unregister() -> None:
    """Restore the exact registry entries :func:`register` replaced. Idempotent."""
    if not _replaced:
        return
    for registry, key in (
        (SAE_CLASS_REGISTRY, "inference"),
        (SAE_TRAINING_CLASS_REGISTRY, "training"),
    ):
        previous = _replaced.pop(key)
        if previous is None:
            registry.pop(ARCHITECTURE, None)
        else:
            registry[ARCHITECTURE] = previous
