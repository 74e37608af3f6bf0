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
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.bad_samples import BadSample, BadSampleCounter
from data_pipeline.buckets import Bucket, bucket_families, decode_to_bucket
from data_pipeline.cache_format import (
    CACHE_INFO,
    EMPTY_PROMPT,
    TENSOR_EXT,
    CacheInfo,
    CacheLayout,
    encode_tensors,
)
from data_pipeline.config import DataConfig
from data_pipeline.images import image_to_tensor
from data_pipeline.tar_samples import expand_shards, iter_samples, parse_sample
from mmdit.atomic_file import atomic_path, write_atomic
from mmdit.conditioning import (
    VAE,
    ComponentError,
    ConditioningConfig,
    TextEncoders,
    conditioning_identity,
    identity_differences,
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
STATS_SUFFIX = ".stats.json"
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
# cache info


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


def crop_rng(seed: int, shard_name: str, index: int) -> random.Random:
    """The RNG of a random crop: seeded by (data.seed, source shard basename, index of the sample
    in the shard), so a re-run or another rank (wherever the source is mounted) crops the
    same way."""
    return random.Random(f"precompute-crop:{seed}:{shard_name}:{index}")


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
        raise PrecomputeError(f"{out / CACHE_INFO}: unreadable ({e}); use another --out") from None


def _mismatch(out: Path, diffs: list[str]) -> str:
    return (
        f"{out} holds a cache made with other encoders or settings ({'; '.join(diffs)}); "
        "one cache never mixes encoders: use another --out"
    )


def check_existing(out: Path, info: CacheInfo) -> bool:
    """True when `out` already holds a cache made the same way; raises PrecomputeError naming
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
        raise PrecomputeError(_mismatch(out, diffs))
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


# ---------------------------------------------------------------------------------------------
# one shard


@dataclass
class _Pending:
    key: str
    url: str
    caption: str
    image: Any  # (3, h, w) float tensor in [-1, 1]
    bucket: Bucket
    crop_top_left: tuple[int, int]
    original_size: tuple[int, int]


class ShardEncoder:
    """Encodes the samples of one source shard into one cache shard."""

    def __init__(self, cfg: PrecomputeConfig, vae: VAE, text: TextEncoders, batch: int):
        self.cfg = cfg
        self.vae = vae
        self.text = text
        self.batch = batch
        self.buckets = bucket_families(cfg.data)

    def _flush(self, items: list[_Pending], writer, counter: BadSampleCounter) -> None:
        import torch

        if not items:
            return
        images = torch.stack([p.image for p in items])
        mean, logvar = self.vae.encode(images)
        emb = self.text.encode([p.caption for p in items])
        bf16 = torch.bfloat16
        for i, p in enumerate(items):
            tensors = {
                "mean": mean[i].to(bf16),
                "logvar": logvar[i].to(bf16),
                "context": emb.context[i].to(bf16),
                "pooled": emb.pooled[i].to(bf16),
            }
            meta = {
                "key": p.key,
                "source_key": p.key,
                "source_url": p.url,
                "caption": p.caption,
                "bucket": list(p.bucket),
                "crop_top_left": list(p.crop_top_left),
                "original_size": list(p.original_size),
            }
            writer.write(
                {
                    "__key__": p.key,
                    TENSOR_EXT: encode_tensors(tensors),
                    "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                }
            )
            counter.add_good()
        items.clear()

    def run(self, url: str, dest: Path) -> dict[str, int]:
        """Write the cache shard of `url` to `dest` (atomically) and its stats beside it."""
        import webdataset as wds

        data = self.cfg.data
        counter = BadSampleCounter()
        pending: dict[Bucket, list[_Pending]] = {}
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                writer = wds.TarWriter(f, encoder=False, mtime=0.0)
                samples = iter_samples(
                    url,
                    counter,
                    open_retries=data.shard_open_retries,
                    retry_wait_s=data.shard_retry_wait_s,
                )
                for index, sample in enumerate(samples):
                    try:
                        parsed = parse_sample(
                            sample, caption=data.caption, empty_caption=data.empty_caption
                        )
                        rng = (
                            crop_rng(data.seed, dest.name, index) if data.crop == "random" else None
                        )
                        img, bucket, top_left, original = decode_to_bucket(
                            parsed["image_bytes"],
                            self.buckets,
                            data.crop,
                            rng,
                            min_side=data.bucket_multiple,
                            key=parsed["key"],
                        )
                    except BadSample as e:
                        counter.add_bad(e.reason)
                        continue
                    queue = pending.setdefault(bucket, [])
                    queue.append(
                        _Pending(
                            parsed["key"],
                            parsed["url"],
                            parsed["caption"],
                            image_to_tensor(img),
                            bucket,
                            top_left,
                            original,
                        )
                    )
                    if len(queue) >= self.batch:
                        self._flush(queue, writer, counter)
                for bucket in sorted(pending):
                    self._flush(pending[bucket], writer, counter)
                writer.close()
                f.flush()
                os.fsync(f.fileno())
            stats = {"shard": dest.name, "source_url": url, **counter.as_dict()}
            write_atomic(
                dest.with_name(dest.name[: -len(".tar")] + STATS_SUFFIX),
                json.dumps(stats, indent=2).encode(),
            )
        return counter.as_dict()


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
    import torch

    if args.batch < 1:
        raise PrecomputeError(f"--batch {args.batch} must be >= 1")
    rank, world = rank_and_world(args.rank, args.world_size)
    cfg = load_config(args.config, args.overrides)
    cond, data = cfg.conditioning, cfg.data
    if not data.shards.strip():
        raise PrecomputeError(
            f"{args.config}: data.shards is empty; set it to the source shards (a brace pattern, "
            "directory or list file), e.g. data.shards=/data/shards"
        )
    try:
        urls = expand_shards(data.shards)
    except ValueError as e:
        raise PrecomputeError(f"data.shards: {e}") from None
    mine = assigned_shards(urls, rank, world)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PrecomputeError("--device cuda but no CUDA device is available; use --device cpu")
    root = cond.components or None
    identity = conditioning_identity(
        root, cond.paths(), use_t5=cond.use_t5, t5_max_length=cond.t5_max_length
    )
    out: Path = args.out
    # Identity first, from the files alone: a mismatch is refused before any weights load.
    recorded = _recorded_info(out)
    settings = data_settings(data)
    if recorded is not None:
        diffs = _differences(
            {"identity": recorded.identity, "data": recorded.extra.get("data")},
            {"identity": identity, "data": settings},
        )
        if diffs:
            raise PrecomputeError(_mismatch(out, diffs))
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

    encoder = ShardEncoder(cfg, vae, text, args.batch)
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
    summary = {
        "rank": rank,
        "world_size": world,
        "shards": len(mine),
        "written": worked,
        "skipped": skipped,
        "seconds": round(work_time, 3),
        "samples_per_s": round(total.good / work_time, 2) if work_time else 0.0,
        **total.as_dict(),
    }
    _log(rank, "summary " + json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (PrecomputeError, ConfigError, ComponentError) as e:
        message = " ".join(str(e).split())
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
