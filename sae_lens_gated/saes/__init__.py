from sae_lens_gated.saes.gated_sae import (
    RECIPES,
    GatedEncoding,
    GatedRecipe,
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    encode_gated,
    encode_gated_features,
)

__all__ = [
    "RECIPES",
    "GatedEncoding",
    "GatedRecipe",
    "GatedSAE",
    "GatedSAEConfig",
    "GatedTrainingSAE",
    "GatedTrainingSAEConfig",
    "encode_gated",
    "encode_gated_features",
]
