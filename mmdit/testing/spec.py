"""What the tiny SD3 component set is made of, shared by every module that writes a part of it.

The numbers SD3 fixes are the ones code written against the real checkpoint relies on; the tiny
choices keep the whole set a few tens of MB. Each component draws from its own seeded random
stream, and JSON files are written in one fixed format, so the same seed gives byte-identical
files.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

# ---- numbers SD3 fixes (what downstream code relies on) -----------------------------------
CLIP_L_PROJECTION_DIM = 768  # CLIP-L pooled size
CLIP_G_PROJECTION_DIM = 1280  # OpenCLIP bigG pooled size; 768 + 1280 = 2048 pooled
T5_D_MODEL = 4096  # T5-XXL width = SD3 joint_attention_dim
VAE_LATENT_CHANNELS = 16
VAE_SCALING_FACTOR = 1.5305
VAE_SHIFT_FACTOR = 0.0609
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
T5_MODEL_MAX_LENGTH = 512
T5_EXTRA_IDS = 100
SCHEDULER_SHIFT = 3.0

# ---- tiny choices (free) -------------------------------------------------------------------
CLIP_L_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CLIP_G_TINY = dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2)
T5_TINY = dict(num_layers=2, num_heads=2, d_kv=8, d_ff=32)
T5_SPM_VOCAB_SIZE = 1000  # sentencepiece pieces incl. <pad> </s> <unk>; + 100 extra ids
VAE_BLOCK_OUT_CHANNELS = (16, 32, 32, 32)  # 4 blocks -> spatial factor 2**3 = 8
VAE_SAMPLE_SIZE = 64

COMPONENT_DIRS = (
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "vae",
)

# Per-component offsets so no two components draw from the same random stream.
SEED_OFFSETS = {"text_encoder": 1, "text_encoder_2": 2, "text_encoder_3": 3, "vae": 4}

Progress = Callable[[str], None]  # called with one line per stage (print, or nothing)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def write_json(path: Path, obj, **kw) -> None:
    """Every JSON file of the set: sorted keys, indented, so equal objects give equal bytes."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, **kw) + "\n", encoding="utf-8")
