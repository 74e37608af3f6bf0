"""`mmdit-precompute`: encode image-caption shards once into a cache of VAE posteriors and text
embeddings (the format is described in `data_pipeline.cache_format`).

    mmdit-precompute --config RUN.yaml [section.key=value ...] --out DIR
                     [--rank R --world-size W] [--device cpu|cuda] [--batch 16]

What it does, per source shard of ``data.shards`` (expanded with `expand_shards`, sorted):

- rank ``r`` of ``W`` takes the shards ``i`` with ``i % W == r``; rank and world size default to
  ``RANK``/``WORLD_SIZE``, else ``SLURM_PROCID``/``SLURM_NTASKS``, else 0/1, so one Slurm array
  or ``srun -n W`` runs it unchanged;
- the cache shard is ``DIR/<same basename>.tar``, written with webdataset's `TarWriter` to
  ``.<name>.tmp`` and renamed when complete: a shard whose final file exists is SKIPPED, so a
  killed job rerun with the same arguments only does the rest;
- every sample is read with `iter_samples` + `parse_sample` (``data.caption``,
  ``data.empty_caption``), decoded to its aspect-ratio bucket with `decode_to_bucket`
  (``min_side`` = ``data.bucket_multiple``, as the image loader does) with the ``data.crop``
  crop: ``center``, or ``random`` drawn from a `random.Random` seeded by (``data.seed``, the
  source shard's basename, the sample's index in the shard) (`crop_rng`), so a re-run, or
  another rank, writes the same cache; the crop is done once, every epoch then sees the same
  one, and ``crop_top_left`` records it. Batched with samples of the same bucket (up to
  ``--batch``), then `VAE.encode` (raw posterior mean and logvar) and `TextEncoders.encode`
  (no dropout: CFG dropout is applied at load time from ``_empty_prompt.safetensors`` with
  `data_pipeline.cache_format.apply_text_dropout`);
- each sample becomes ``{key}.safetensors`` (``mean``, ``logvar`` (16, h/8, w/8), ``context``
  (77 + T5_len, 4096), ``pooled`` (2048), all bf16) and ``{key}.json`` (``key``,
  ``source_key``, ``source_url``, ``caption``, ``bucket`` [h, w], ``crop_top_left``
  [top, left], ``original_size`` [h, w]); cache keys equal the source keys;
- bad samples are skipped and counted per reason (`BadSampleCounter`), never fatal; the counts
  of each shard go to ``DIR/<basename>.stats.json`` (written before the shard is renamed into
  place) and a summary is printed at the end.

Rank 0 writes ``DIR/_cache_info.json`` (`CacheInfo`: `conditioning_identity` of the encoders
and settings, the context layout, dtype, and in ``extra["data"]`` the data settings that decide
a sample's pixels and caption, `data_settings`) and ``DIR/_empty_prompt.safetensors``
(``context`` (77 + T5_len, 4096) and ``pooled`` (2048) of the empty prompt, bf16, UNBATCHED
like a sample; `data_pipeline.cache_format.load_empty_prompt` reads it). A DIR whose
``_cache_info.json`` records other encoders, settings, layout or data settings is refused
(exit 2): one cache never mixes encoders, resolutions or crops.

Errors a user can fix (no ``data.shards``, a spec matching nothing, missing components, a
mismatching cache) are one line on stderr and exit code 2.

This module is the command's driver (run file, ranks, shard assignment, progress); one shard's
encoding is `data_pipeline.cache_writer.ShardEncoder`, the cache info and its checks are in
`data_pipeline.cache_info`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.bad_samples import BadSampleCounter
from data_pipeline.cache_format import CacheInfo
from data_pipeline.cache_info import (
    CacheMismatch,
    check_existing,
    check_identity,
    data_settings,
    make_layout,
    write_cache_info,
)
from data_pipeline.cache_writer import ShardEncoder
from data_pipeline.config import DataConfig
from data_pipeline.tar_samples import expand_shards
from mmdit.conditioning import (
    ComponentError,
    ConditioningConfig,
    conditioning_identity,
    load_text_encoders,
    load_vae,
)
from mmdit.typed_config import (
    ConfigError,
    add_config_arguments,
    apply_overrides,
    from_dict,
    read_file,
)

PROG = "mmdit-precompute"
CACHE_DTYPE = "bfloat16"
# Sections of the run file this job reads; the others belong to the trainer / launcher.
SECTIONS: tuple[str, ...] = ("conditioning", "data")
# The other RunConfig sections: present in the run file, ignored here (with their overrides).
OTHER_SECTIONS: tuple[str, ...] = ("model", "train", "eval", "launch")


class PrecomputeError(Exception):
    """A problem the user can fix: reported as one line, exit code 2."""


@dataclass(frozen=True)
class PrecomputeConfig:
    """The part of the run file (`training.config.RunConfig`) precompute needs.

    data_pipeline may not import `training` (import-linter contract), so the full RunConfig
    schema is not available here; this schema holds the two sections that decide what the cache
    contains, with the very same dataclasses, so their keys and types are checked exactly as
    the trainer checks them."""

    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    data: DataConfig = field(default_factory=DataConfig)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> PrecomputeConfig:
    """Read a run file (with its `base:` chain) into a PrecomputeConfig.

    The file also holds model/train/eval/launch sections that this schema does not know
    (`from_dict` would reject them as unknown keys), so only the `conditioning` and `data`
    sections are kept, and only overrides of those sections are applied; overrides of the
    trainer's sections are ignored so the same command line can be shared with training. The
    trainer validates the whole file. An override of any other section is an error (a typo)."""
    raw = read_file(path)
    kept = {name: raw[name] for name in SECTIONS if name in raw}
    mine = []
    for override in overrides:
        section = override.partition("=")[0].strip().split(".", 1)[0]
        if section in SECTIONS:
            mine.append(override)
        elif section not in OTHER_SECTIONS:
            known = ", ".join((*SECTIONS, *OTHER_SECTIONS))
            raise ConfigError(
                f"override '{override}': unknown section '{section}'; known sections: {known}"
            )
    data = apply_overrides(PrecomputeConfig, kept, mine)
    source = f"{path} + overrides" if mine else str(path)
    return from_dict(PrecomputeConfig, data, source=source)


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """--rank/--world-size, else RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS, else 0/1."""
    env = os.environ

    def pick(value: int | None, *names: str, default: int) -> int:
        if value is not None:
            return value
        for name in names:
            if env.get(name, "").strip():
                try:
                    return int(env[name])
                except ValueError:
                    raise PrecomputeError(f"{name}={env[name]!r} is not an integer") from None
        return default

    r = pick(rank, "RANK", "SLURM_PROCID", default=0)
    w = pick(world_size, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    if w < 1 or not 0 <= r < w:
        raise PrecomputeError(f"rank {r} / world size {w}: need world size >= 1, 0 <= rank < W")
    return r, w


def output_name(url: str) -> str:
    """Cache shard file name for a source shard URL: its basename, ending in .tar."""
    base = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0].strip()
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)] + ".tar"
    if not base.endswith(".tar") or base in (".tar", "") or base.startswith("_"):
        raise PrecomputeError(
            f"source shard {url!r}: cannot name its cache shard (need a basename ending in .tar "
            "that does not start with '_')"
        )
    return base


def assigned_shards(urls: Sequence[str], rank: int, world_size: int) -> list[tuple[str, str]]:
    """(url, output name) of the shards of this rank: index i % world_size == rank of the
    sorted list. Two sources with one basename would overwrite each other: refused."""
    ordered = sorted(urls)
    names = [output_name(u) for u in ordered]
    seen: dict[str, str] = {}
    for url, name in zip(ordered, names, strict=True):
        if name in seen:
            raise PrecomputeError(
                f"source shards {seen[name]!r} and {url!r} have the same basename {name!r}; "
                "their cache shards would collide: precompute them into different --out dirs"
            )
        seen[name] = url
    pairs = list(zip(ordered, names, strict=True))
    return [p for i, p in enumerate(pairs) if i % world_size == rank]


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Precompute the training cache: VAE posteriors (mean, logvar) and text embeddings "
            "(context, pooled) of every sample of data.shards, in bf16, one cache shard per "
            "source shard (same name) under --out. Crops follow data.crop (random ones seeded by "
            "data.seed, shard and sample, so re-runs are identical); resumable "
            "(existing cache shards are skipped); shards split over ranks by index."
        ),
        epilog=(
            "Example: mmdit-precompute --config configs/debug_cpu.yaml --out /cache/laion-256 "
            "data.resolution=256.  Under Slurm: srun -n 8 mmdit-precompute ... (rank and world "
            "size come from SLURM_PROCID / SLURM_NTASKS). Then train with data.cache_shards=DIR."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="cache directory (created)")
    parser.add_argument(
        "--rank", type=int, default=None, help="this process (default: RANK / SLURM_PROCID / 0)"
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="number of processes (default: WORLD_SIZE / SLURM_NTASKS / 1)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the encoders run (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--batch", type=int, default=16, help="samples per encoder call, same bucket (default 16)"
    )
    return parser


def _log(rank: int, message: str) -> None:
    print(f"{PROG}[rank {rank}]: {message}", flush=True)


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise PrecomputeError(f"--batch {args.batch} must be >= 1")
    rank, world = rank_and_world(args.rank, args.world_size)
    cfg = load_config(args.config, args.overrides)
    cond, data = cfg.conditioning, cfg.data
    urls = _source_shards(args.config, data)
    mine = assigned_shards(urls, rank, world)
    device = _pick_device(args.device)
    identity = conditioning_identity(
        cond.components or None, cond.paths(), use_t5=cond.use_t5, t5_max_length=cond.t5_max_length
    )
    out: Path = args.out
    settings = data_settings(data)
    # Identity first, from the files alone: a mismatch is refused before any weights load.
    check_identity(out, identity, settings)
    t0 = time.perf_counter()
    text = load_text_encoders(cond, device)
    vae = load_vae(cond, device)
    info = CacheInfo(
        identity=identity,
        layout=make_layout(text),
        dtype=CACHE_DTYPE,
        extra={"data": settings},
    )
    out.mkdir(parents=True, exist_ok=True)
    have_info = check_existing(out, info)
    if rank == 0 and not have_info:
        write_cache_info(out, info, text)
    _log(
        rank,
        f"{len(mine)} of {len(urls)} source shards (world size {world}) -> {out}; encoders "
        f"loaded on {device} ({cond.dtype}) in {time.perf_counter() - t0:.1f} s",
    )
    summary = _encode_shards(ShardEncoder(data, vae, text, args.batch), mine, out, rank)
    _log(rank, "summary " + json.dumps({"rank": rank, "world_size": world, **summary}))
    return 0


def _source_shards(config: str | os.PathLike, data: DataConfig) -> list[str]:
    if not data.shards.strip():
        raise PrecomputeError(
            f"{config}: data.shards is empty; set it to the source shards (a brace pattern, "
            "directory or list file), e.g. data.shards=/data/shards"
        )
    try:
        return expand_shards(data.shards)
    except ValueError as e:
        raise PrecomputeError(f"data.shards: {e}") from None


def _pick_device(device: str | None) -> str:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PrecomputeError("--device cuda but no CUDA device is available; use --device cpu")
    return device


def _encode_shards(
    encoder: ShardEncoder, mine: list[tuple[str, str]], out: Path, rank: int
) -> dict[str, Any]:
    """Every assigned shard without a cache shard yet, with a progress line each; the counts."""
    total = BadSampleCounter()
    done = skipped = 0
    work_time = 0.0
    worked = 0
    for index, (url, name) in enumerate(mine):
        dest = out / name
        if dest.exists():
            skipped += 1
            done += 1
            _log(rank, f"{name}: skipped (exists)  [{done}/{len(mine)}]")
            continue
        start = time.perf_counter()
        counts = encoder.run(url, dest)
        elapsed = time.perf_counter() - start
        total.merge(counts)
        done += 1
        worked += 1
        work_time += elapsed
        remaining = sum(1 for _, n in mine[index + 1 :] if not (out / n).exists())
        eta = work_time / worked * remaining
        bad = {k: v for k, v in counts.items() if k != "good" and v}
        _log(
            rank,
            f"{name}: {counts['good']} samples, bad {bad or 0}, "
            f"{counts['good'] / max(elapsed, 1e-9):.1f} samples/s  "
            f"[{done}/{len(mine)} shards, ETA {_format_eta(eta)}]",
        )
    return {
        "shards": len(mine),
        "written": worked,
        "skipped": skipped,
        "seconds": round(work_time, 3),
        "samples_per_s": round(total.good / work_time, 2) if work_time else 0.0,
        **total.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (PrecomputeError, CacheMismatch, ConfigError, ComponentError) as e:
        message = " ".join(str(e).split())
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
