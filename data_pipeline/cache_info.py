"""What a precomputed cache records about how it was made (`_cache_info.json`: the encoders'
identity, the context layout, the dtype and the data settings, with the empty prompt beside it),
and the check that refuses to add to a cache made another way."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_pipeline.cache_format import (
    CACHE_INFO,
    EMPTY_PROMPT,
    CacheInfo,
    CacheLayout,
    encode_tensors,
)
from data_pipeline.config import DataConfig
from mmdit.atomic_file import write_atomic
from mmdit.conditioning import TextEncoders, identity_differences


class CacheMismatch(Exception):
    """The output directory holds a cache made another way (or an unreadable cache info)."""


def make_layout(text: TextEncoders) -> CacheLayout:
    return CacheLayout(
        clip_length=77,
        clip_l_dim=int(text.clip_l.model.config.hidden_size),
        clip_g_dim=int(text.clip_g.model.config.hidden_size),
        t5_length=int(text.t5_max_length),
        pooled_l_dim=int(text.clip_l.model.config.projection_dim),
    )


def data_settings(data: DataConfig) -> dict[str, Any]:
    """The `data` settings that decide what a cache sample holds (bucket, crop, caption); the
    seed only matters for random crops. Recorded in CacheInfo.extra["data"]; `resolutions`
    only for a multi-resolution cache, so one-resolution caches keep their record."""
    several = {"resolutions": list(data.all_resolutions)} if len(data.all_resolutions) > 1 else {}
    return {
        **several,
        "resolution": data.resolution,
        "bucket_multiple": data.bucket_multiple,
        "max_aspect_ratio": data.max_aspect_ratio,
        "crop": data.crop,
        "crop_seed": data.seed if data.crop == "random" else None,
        "caption": data.caption,
        "empty_caption": data.empty_caption,
    }


def _differences(recorded: Any, current: Any) -> list[str]:
    return [
        f"{key}: cache has {a!r}, this run {b!r}"
        for key, a, b in identity_differences(recorded, current)
    ]


def _recorded_info(out: Path) -> CacheInfo | None:
    if not (out / CACHE_INFO).is_file():
        return None
    try:
        return CacheInfo.load(out)
    except (ValueError, TypeError, KeyError) as e:
        raise CacheMismatch(f"{out / CACHE_INFO}: unreadable ({e}); use another --out") from None


def _mismatch(out: Path, diffs: list[str]) -> str:
    return (
        f"{out} holds a cache made with other encoders or settings ({'; '.join(diffs)}); "
        "one cache never mixes encoders: use another --out"
    )


def check_existing(out: Path, info: CacheInfo) -> bool:
    """True when `out` already holds a cache made the same way; raises CacheMismatch naming
    every difference when it was made another way. False when there is no cache info yet."""
    recorded = _recorded_info(out)
    if recorded is None:
        return False
    diffs = _differences(
        {
            "identity": recorded.identity,
            "layout": asdict(recorded.layout),
            "dtype": recorded.dtype,
            "data": recorded.extra.get("data"),
        },
        {
            "identity": info.identity,
            "layout": asdict(info.layout),
            "dtype": info.dtype,
            "data": info.extra.get("data"),
        },
    )
    if diffs:
        raise CacheMismatch(_mismatch(out, diffs))
    return True


def write_cache_info(out: Path, info: CacheInfo, text: TextEncoders) -> None:
    """The empty prompt (unbatched: context (L, D), pooled (P,), bf16), then the cache info."""
    import torch

    empty = text.encode([""])
    write_atomic(
        out / EMPTY_PROMPT,
        encode_tensors(
            {
                "context": empty.context[0].to(torch.bfloat16),
                "pooled": empty.pooled[0].to(torch.bfloat16),
            }
        ),
    )
    info.save(out)  # last: a cache info always has its empty prompt beside it


def check_identity(out: Path, identity: Any, settings: dict[str, Any]) -> None:
    """Refuses a cache made with other encoders or data settings, from the files alone (before
    any weights load); the layout and dtype are checked by check_existing once they are known."""
    recorded = _recorded_info(out)
    if recorded is not None:
        diffs = _differences(
            {"identity": recorded.identity, "data": recorded.extra.get("data")},
            {"identity": identity, "data": settings},
        )
        if diffs:
            raise CacheMismatch(_mismatch(out, diffs))
