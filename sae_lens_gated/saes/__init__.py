from sae_lens_gated.saes.gated_sae import (
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
)
from sae_lens_gated.saes.gated_untied_sae import (
    GatedUntiedSAE,
    GatedUntiedSAEConfig,
    GatedUntiedTrainingSAE,
    GatedUntiedTrainingSAEConfig,
)

__all__ = [
    "GatedSAE",
    "GatedSAEConfig",
    "GatedTrainingSAE",
    "GatedTrainingSAEConfig",
    "GatedUntiedSAE",
    "GatedUntiedSAEConfig",
    "GatedUntiedTrainingSAE",
    "GatedUntiedTrainingSAEConfig",
]
