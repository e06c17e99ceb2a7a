from sae_lens_gated.saes.gated_encoder import (
    GatedEncoding,
    encode_gated,
    encode_gated_features,
)
from sae_lens_gated.saes.gated_sae import (
    RECIPES,
    GatedRecipe,
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
    "RECIPES",
    "GatedEncoding",
    "GatedRecipe",
    "GatedSAE",
    "GatedSAEConfig",
    "GatedTrainingSAE",
    "GatedTrainingSAEConfig",
    "GatedUntiedSAE",
    "GatedUntiedSAEConfig",
    "GatedUntiedTrainingSAE",
    "GatedUntiedTrainingSAEConfig",
    "encode_gated",
    "encode_gated_features",
]
