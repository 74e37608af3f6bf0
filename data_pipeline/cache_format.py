"""The precompute cache: WebDataset shards of VAE posteriors and text embeddings.

One cache shard per source shard (same file name), written by `mmdit-precompute`, read by the
loader in `latents` mode. Per sample, two members:

- `{key}.safetensors`: `mean`, `logvar` (16, h, w) — the raw VAE posterior, not a sample, so
  training draws a fresh latent every visit — `context` (77 + T5_len, 4096) and `pooled`
  (2048), all bf16 (or fp16). The context is assembled as SD3 does (CLIP-L | bigG | zero pad,
  then T5), so CFG dropout is applied at load time by swapping the per-encoder parts
  described in `CacheInfo.layout` for the stored empty-prompt embedding.
- `{key}.json`: source key and shard, caption, pixel bucket (h, w), crop top-left, original
  size.

Beside the shards: `_cache_info.json` (CacheInfo: encoder identities, layout, dtype) and
`_empty_prompt.safetensors` (the empty prompt's context and pooled, for dropout). A loader
refuses a cache whose identity differs from the encoders it is configured with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

CACHE_INFO = "_cache_info.json"
EMPTY_PROMPT = "_empty_prompt.safetensors"
TENSOR_EXT = "safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CacheLayout:
    clip_length: int  # tokens of the CLIP part (77)
    clip_l_dim: int  # channels of CLIP-L's penultimate states at the start of the CLIP part
    clip_g_dim: int  # channels of bigG's right after them
    t5_length: int  # tokens of the T5 part that follow the CLIP tokens
    pooled_l_dim: int  # CLIP-L's share of the pooled vector (first entries)


@dataclass(frozen=True)
class CacheInfo:
    identity: dict[str, Any]  # encoders + settings that made the cache (see check in loader)
    layout: CacheLayout
    dtype: str = "bfloat16"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CACHE_INFO
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | Path) -> CacheInfo:
        path = Path(directory) / CACHE_INFO
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: not a precompute cache directory (write one with "
                "mmdit-precompute, or point data.cache_shards at its shards)"
            )
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: cache format {data.get('format_version')} != {FORMAT_VERSION}; "
                "recompute the cache with this version's mmdit-precompute"
            )
        data["layout"] = CacheLayout(**data["layout"])
        return cls(**data)


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)
