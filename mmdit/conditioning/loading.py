"""The frozen VAE and text encoders a `conditioning` section describes, loaded onto a device.

The one way every stage loads them (precompute, the trainer, validation, previews, sampling and
evaluation), so the components, per-component paths, T5 settings, dtype and VAE chunking of a
run mean the same thing everywhere.
"""

from __future__ import annotations

import torch

from mmdit.conditioning.config import ConditioningConfig
from mmdit.conditioning.text import TextEncoders
from mmdit.conditioning.vae import VAE

# The run file's dtype names (conditioning.dtype, and the model dtypes of sampling/evaluation).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_vae(config: ConditioningConfig, device: torch.device | str) -> VAE:
    return VAE.from_pretrained(
        config.components or None,
        path=config.paths().get("vae"),
        dtype=DTYPES[config.dtype],
        device=device,
        chunk_size=config.vae_chunk_size,
    )


def load_text_encoders(config: ConditioningConfig, device: torch.device | str) -> TextEncoders:
    return TextEncoders.from_pretrained(
        config.components or None,
        paths=config.paths(),
        use_t5=config.use_t5,
        t5_max_length=config.t5_max_length,
        dtype=DTYPES[config.dtype],
        device=device,
    )
