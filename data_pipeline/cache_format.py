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
`_empty_prompt.safetensors` (the empty prompt's `context` (77 + T5_len, 4096) and `pooled`
(2048), unbatched like a sample, in the cache dtype; read it with `load_empty_prompt`). A loader
refuses a cache whose identity differs from the encoders it is configured with.

CFG dropout on cached embeddings (`apply_text_dropout`) gives exactly what
`mmdit.conditioning.TextEncoders.encode(prompts, dropped=...)` gives: a dropped CLIP-L or bigG
has its hidden states (CLIP tokens, its channels) and its share of the pooled vector replaced by
the empty prompt's, a dropped T5 has its tokens set to zeros.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mmdit.atomic_file import write_atomic

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
        write_atomic(
            Path(directory) / CACHE_INFO, json.dumps(asdict(self), indent=2, sort_keys=True)
        )

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


def load_empty_prompt(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (L, D), pooled (P,)) of the empty prompt stored beside the cache shards in
    `directory`, as stored (cache dtype, CPU). A batched file ((1, L, D), (1, P)) is accepted
    and unbatched."""
    path = Path(directory) / EMPTY_PROMPT
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the cache has no empty-prompt embedding for CFG dropout; "
            "re-run mmdit-precompute on this cache directory"
        )
    try:
        tensors = decode_tensors(path.read_bytes())
    except Exception as e:
        raise ValueError(
            f"{path}: unreadable ({e}); delete it and re-run mmdit-precompute"
        ) from None
    missing = [name for name in ("context", "pooled") if name not in tensors]
    if missing:
        raise ValueError(
            f"{path}: no {' / '.join(missing)} tensor (has {sorted(tensors)}); "
            "re-run mmdit-precompute"
        )
    context, pooled = tensors["context"], tensors["pooled"]
    if context.ndim == 3 and context.shape[0] == 1:
        context = context[0]
    if pooled.ndim == 2 and pooled.shape[0] == 1:
        pooled = pooled[0]
    if context.ndim != 2 or pooled.ndim != 1:
        raise ValueError(
            f"{path}: expected context (L, D) and pooled (P,) (or batched with batch 1), got "
            f"{tuple(tensors['context'].shape)} and {tuple(tensors['pooled'].shape)}"
        )
    return context, pooled


def _unbatch(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t[0] if t.ndim == ndim + 1 and t.shape[0] == 1 else t


def apply_text_dropout(
    context: torch.Tensor,
    pooled: torch.Tensor,
    dropped: torch.Tensor,
    empty_context: torch.Tensor,
    empty_pooled: torch.Tensor,
    layout: CacheLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG dropout on cached text embeddings; new tensors, the inputs are left untouched.

    context (B, L, D), pooled (B, P); dropped (B, 3) bool, columns CLIP-L, bigG, T5 dropped;
    empty_context (L, D) and empty_pooled (P,) the empty prompt's (`load_empty_prompt`; a
    leading batch of 1 is accepted). For each sample, a dropped CLIP-L takes the empty
    prompt's context[:clip_length, :clip_l_dim] and pooled[:pooled_l_dim], a dropped bigG its
    context[:clip_length, clip_l_dim:clip_l_dim + clip_g_dim] and pooled[pooled_l_dim:], and a
    dropped T5 gets zeros in context[clip_length:clip_length + t5_length]: exactly
    `TextEncoders.encode(prompts, dropped=dropped)`.

    `dropped` should be on the CPU (as `draw_dropout` makes it): deciding which parts to mix
    then needs no device sync, and the mask and the empty prompt (when not already there) go
    to the context's device with non-blocking copies and to its dtype; nothing waits for the
    device. Keep the empty prompt on the device to save its copy per call.
    """
    if context.ndim != 3 or pooled.ndim != 2:
        raise ValueError(
            f"context must be (B, L, D) and pooled (B, P), got {tuple(context.shape)} and "
            f"{tuple(pooled.shape)}"
        )
    B, L, D = context.shape
    P = pooled.shape[1]
    if pooled.shape[0] != B:
        raise ValueError(f"context has batch {B} but pooled {pooled.shape[0]}")
    if tuple(dropped.shape) != (B, 3) or dropped.dtype != torch.bool:
        raise ValueError(
            f"dropped must be a (B, 3) = ({B}, 3) bool tensor (CLIP-L, bigG, T5), got "
            f"{tuple(dropped.shape)} {dropped.dtype}"
        )
    c, t5 = layout.clip_length, layout.t5_length
    lo_g, hi_g = layout.clip_l_dim, layout.clip_l_dim + layout.clip_g_dim
    if c + t5 != L or hi_g > D or not 0 < layout.pooled_l_dim < P:
        raise ValueError(
            f"context {tuple(context.shape)} / pooled {tuple(pooled.shape)} do not fit the "
            f"cache layout {layout} (need L = clip_length + t5_length = {c + t5}, "
            f"D >= clip_l_dim + clip_g_dim = {hi_g}, P > pooled_l_dim = {layout.pooled_l_dim})"
        )
    empty_context = _unbatch(empty_context, 2)
    empty_pooled = _unbatch(empty_pooled, 1)
    if tuple(empty_context.shape) != (L, D) or tuple(empty_pooled.shape) != (P,):
        raise ValueError(
            f"empty prompt context {tuple(empty_context.shape)} / pooled "
            f"{tuple(empty_pooled.shape)} do not match the batch's ({L}, {D}) / ({P},)"
        )
    dropped = dropped.cpu()  # a no-op for the CPU mask this expects
    context = context.clone()
    pooled = pooled.clone()
    pl = layout.pooled_l_dim
    parts = ((0, lo_g, 0, pl), (lo_g, hi_g, pl, P))  # CLIP-L, bigG: context and pooled channels
    for i, (lo, hi, plo, phi) in enumerate(parts):
        if not dropped[:, i].any():
            continue
        keep = ~dropped[:, i]
        keep_c = keep.to(context.device, non_blocking=True)[:, None, None]
        keep_p = keep.to(pooled.device, non_blocking=True)[:, None]
        empty_c = empty_context[:c, lo:hi].to(context.device, context.dtype, non_blocking=True)
        empty_p = empty_pooled[plo:phi].to(pooled.device, pooled.dtype, non_blocking=True)
        context[:, :c, lo:hi] = torch.where(keep_c, context[:, :c, lo:hi], empty_c)
        pooled[:, plo:phi] = torch.where(keep_p, pooled[:, plo:phi], empty_p)
    if dropped[:, 2].any():
        keep_t5 = (~dropped[:, 2]).to(context.device, non_blocking=True)[:, None, None]
        context[:, c:] = torch.where(
            keep_t5, context[:, c:], torch.zeros((), dtype=context.dtype, device=context.device)
        )
    return context, pooled
