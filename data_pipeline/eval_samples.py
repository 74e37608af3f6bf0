"""A finite, ordered pass over held-out shards for evaluation.

The training loader streams forever in a shuffled order that depends on the world size; an
evaluation needs the opposite: every sample exactly once, in one fixed order, the same set on
any number of ranks, so numbers are comparable across checkpoints, runs and cluster sizes.

Order: shards as listed (`expand_shards`), samples in shard order. The n-th sample the tars
yield has global index n; with `limit`, only indices below it are used; rank r takes the
indices n with n % world == r. The index is assigned before decoding, so it never depends on
which rank found a sample undecodable (such samples are skipped and counted, as in training).
Images are always centre-cropped to their bucket.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.bad_samples import BadSample, BadSampleCounter
from data_pipeline.batches import Batch, Sample, collate
from data_pipeline.buckets import Bucket, bucket_families
from data_pipeline.cache_format import CACHE_INFO
from data_pipeline.config import DataConfig
from data_pipeline.decode import ShardKind, decode_item
from data_pipeline.tar_samples import expand_shards, iter_samples


def shard_mode(shards: str) -> ShardKind:
    """ "latents" for precomputed cache shards (their folder has the cache info), else
    "images"."""
    urls = expand_shards(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    return "latents" if (Path(urls[0]).parent / CACHE_INFO).is_file() else "images"


@dataclass(frozen=True)
class EvalItem:
    index: int  # global position in the ordered pass
    item: Sample  # an ImageSample or a LatentSample, as the shards hold


@dataclass(frozen=True)
class IndexedBatch:
    """A held-out batch and the global positions of its samples in the ordered pass."""

    indices: list[int]
    batch: Batch


def eval_items(
    config: DataConfig,
    shards: str,
    *,
    mode: ShardKind,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    counter: BadSampleCounter | None = None,
) -> Iterator[EvalItem]:
    """This rank's share of the first `limit` samples of `shards` (all when None)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    urls = expand_shards(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    buckets = bucket_families(config) if mode == "images" else None
    counter = counter if counter is not None else BadSampleCounter()
    index = 0
    for url in urls:
        for position, sample in enumerate(iter_samples(url, counter)):
            if limit is not None and index >= limit:
                return
            mine = index % world_size == rank
            index += 1
            if not mine:
                continue
            try:
                item = decode_item(config, mode, buckets, (0, url, position), sample, "center")
            except BadSample as bad:
                counter.add_bad(bad.reason)
                continue
            yield EvalItem(index - 1, item)


def eval_batches(
    config: DataConfig,
    shards: str,
    *,
    mode: ShardKind,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    counter: BadSampleCounter | None = None,
) -> Iterator[IndexedBatch]:
    """eval_items grouped into batches of one bucket each (a bucket's batch is emitted when it
    is full, the rest at the end), each with the items' global positions."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    pending: dict[Bucket, list[EvalItem]] = defaultdict(list)

    def emit(entries: list[EvalItem]) -> IndexedBatch:
        batch = collate([e.item for e in entries], [0] * len(entries))
        return IndexedBatch([e.index for e in entries], batch)

    for entry in eval_items(
        config,
        shards,
        mode=mode,
        rank=rank,
        world_size=world_size,
        limit=limit,
        counter=counter,
    ):
        queue = pending[entry.item.bucket]
        queue.append(entry)
        if len(queue) == batch_size:
            yield emit(queue)
            queue.clear()
    for queue in pending.values():
        if queue:
            yield emit(queue)
