"""SD3's frozen conditioning: CLIP-L, OpenCLIP bigG and T5-XXL text encoders and the 16-channel
VAE, loaded offline from a diffusers-layout directory (transformers/diffusers import lazily)."""

from mmdit.conditioning.components import (
    ComponentError,
    StaleEmbeddingsError,
    check_identity,
    conditioning_identity,
    identity_differences,
    identity_hash,
)
from mmdit.conditioning.config import ConditioningConfig
from mmdit.conditioning.loading import DTYPES, load_text_encoders, load_vae
from mmdit.conditioning.text import DEFAULT_DROPOUT, TextEmbeddings, TextEncoders, draw_dropout
from mmdit.conditioning.vae import VAE

__all__ = [
    "DEFAULT_DROPOUT",
    "DTYPES",
    "VAE",
    "ComponentError",
    "ConditioningConfig",
    "StaleEmbeddingsError",
    "TextEmbeddings",
    "TextEncoders",
    "check_identity",
    "conditioning_identity",
    "identity_differences",
    "draw_dropout",
    "identity_hash",
    "load_text_encoders",
    "load_vae",
]
