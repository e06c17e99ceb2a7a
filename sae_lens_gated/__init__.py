"""Gated sparse autoencoders (Rajamanoharan et al. 2024) trained as the paper specifies.

Importing this package makes ``architecture="gated"`` in SAELens resolve to the plugin's
classes (set ``SAE_LENS_GATED_NO_AUTOREGISTER=1`` to opt out and call :func:`register`
yourself); :func:`unregister` restores SAELens's built-in gated SAE.
"""

__version__ = "0.1.0"

import os

from sae_lens_gated.conversion import (
    GatedSAEExportError,
    save_dictionary_learning,
    to_jumprelu,
)
from sae_lens_gated.loading import GatedSAELoadError, load_gated_sae
from sae_lens_gated.metrics import relative_reconstruction_bias
from sae_lens_gated.presets import paper_runner_overrides
from sae_lens_gated.registration import is_registered, register, unregister
from sae_lens_gated.saes import (
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    GatedUntiedSAE,
    GatedUntiedSAEConfig,
    GatedUntiedTrainingSAE,
    GatedUntiedTrainingSAEConfig,
)
from sae_lens_gated.training.batch_guard import NonFiniteBatchError
from sae_lens_gated.validation import GatedConfigError

__all__ = [
    "GatedConfigError",
    "GatedSAE",
    "GatedSAEConfig",
    "GatedSAEExportError",
    "GatedSAELoadError",
    "GatedTrainingSAE",
    "GatedTrainingSAEConfig",
    "GatedUntiedSAE",
    "GatedUntiedSAEConfig",
    "GatedUntiedTrainingSAE",
    "GatedUntiedTrainingSAEConfig",
    "NonFiniteBatchError",
    "__version__",
    "is_registered",
    "load_gated_sae",
    "paper_runner_overrides",
    "register",
    "relative_reconstruction_bias",
    "save_dictionary_learning",
    "to_jumprelu",
    "unregister",
]

if os.environ.get("SAE_LENS_GATED_NO_AUTOREGISTER", "") not in ("1", "true", "True"):
    register()
