"""The training loader: shards -> aspect-bucketed batches, resumable to the exact next sample.

One module: the stream, its resumable state and the resharding of that state share one layout
(slots, shard order, positions) and are only right together.

Layout. Every rank runs `num_workers` DataLoader workers; rank r's worker w owns the *slot*
r * num_workers + w. Each epoch, the shard list is shuffled with a seed from (seed, epoch),
identically on all ranks, and slot s takes shards s, s + S, s + 2S, ... (S = world_size x
num_workers), so no sample is seen twice in an epoch and all slots together read the whole
epoch. With `resample`, each slot instead draws its shards with replacement (an infinite
stream; a "pseudo-epoch" is len(shards) / S draws).

Each slot's stream is infinite (epoch after epoch) and deterministic: samples pass a shuffle
buffer (seeded per slot), are decoded and cropped (random crops seeded by the sample's epoch,
shard and index), and wait in per-bucket queues until a bucket has a full batch. Because no
worker ever runs dry, torch's DataLoader hands out batches in strict worker round-robin. With
several resolutions (data.resolutions) a bucket's batch is full at its family's micro batch
(data_pipeline.buckets.micro_batch_for), so batches of different families differ in size. A
batch is typed by its source (data_pipeline.batches): an ImageBatch from raw image shards, a
LatentBatch from cache shards (data.cache_shards).

Exact resume. Every batch carries its worker's state right after that batch: epoch, shard and
sample cursor, the shuffle buffer and bucket queues as sample *references* (epoch, shard,
index), the RNG state and the bad-sample counts. The loader keeps the state of each worker's
last *consumed* batch (prefetched batches do not count) and the number of batches consumed.
A new loader given that state re-reads the referenced samples, fast-forwards each shard cursor
without decoding, and rotates worker ids so the worker whose turn was next goes first: the
batches that follow are exactly those an uninterrupted loader would have produced. Resuming
needs the same world size and worker count (the slots depend on both).
"""

from __future__ import annotations

import random
from array import array
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.bad_samples import REASONS, BadSample, BadSampleCounter
from data_pipeline.batches import Batch, Sample, collate
from data_pipeline.buckets import Bucket, bucket_families, micro_batch_for
from data_pipeline.cache_format import CacheInfo
from data_pipeline.config import DataConfig
from data_pipeline.decode import Ref, ShardKind, decode_item
from data_pipeline.tar_samples import expand_shards, iter_samples

STATE_FORMAT = 1


@dataclass
class StreamState:
    """Where one slot's stream is, as plain data (JSON-serialisable)."""

    epoch: int = 0
    shard_pos: int = 0  # index into this slot's shard list for `epoch`
    sample_pos: int = 0  # samples of that shard already taken into the buffer
    shard_bad_events: int = 0  # bad events of that shard already counted (no double count)
    buffer: list[Ref] = field(default_factory=list)
    pending: dict[str, list[Ref]] = field(default_factory=dict)  # "HxW" -> refs
    rng: list[Any] | None = None  # random.Random state
    bad: dict[str, int] = field(default_factory=dict)
    batches: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StreamState:
        state = cls(**data)
        state.buffer = [tuple(r) for r in state.buffer]
        state.pending = {b: [tuple(r) for r in refs] for b, refs in state.pending.items()}
        return state


def _rng_state_to_data(state: tuple) -> list[Any]:
    # The 625-word Mersenne Twister state as one hex string: compact in checkpoints, and cheap
    # for the DataLoader to pass along with every batch (a list of 625 ints is walked per batch).
    version, internal, gauss = state
    return [version, array("Q", internal).tobytes().hex(), gauss]


def _rng_state_from_data(data: Sequence[Any]) -> tuple:
    return (data[0], tuple(array("Q", bytes.fromhex(data[1]))), data[2])


def slot_shards(
    shards: Sequence[str], *, epoch: int, slot: int, num_slots: int, seed: int, resample: bool
) -> list[str]:
    """The shards slot `slot` reads in `epoch` (same answer on every rank and worker)."""
    if resample:
        rng = random.Random(f"resample:{seed}:{epoch}:{slot}")
        return [rng.choice(shards) for _ in range(max(1, len(shards) // num_slots))]
    order = list(shards)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order[slot::num_slots]


def _fetch(refs: Sequence[Ref], config: DataConfig) -> dict[Ref, dict]:
    """Re-read referenced samples (restoring a saved buffer): one pass per shard."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for _, url, index in refs:
        wanted[url].add(index)
    found: dict[tuple[str, int], dict] = {}
    for url, indices in wanted.items():
        last = max(indices)
        samples = iter_samples(url, **_retries(config))
        for index, sample in enumerate(samples):
            if index in indices:
                found[(url, index)] = sample
            if index >= last:
                break
    missing = [r for r in refs if (r[1], r[2]) not in found]
    if missing:
        raise RuntimeError(
            f"cannot resume the data stream: {len(missing)} saved samples are no longer in "
            f"their shards (first: {missing[0][1]} #{missing[0][2]}); the shards changed "
            "since the checkpoint"
        )
    return {r: found[(r[1], r[2])] for r in refs}


def _retries(config: DataConfig) -> dict[str, Any]:
    """How iter_samples retries a shard it cannot open (see data.shard_open_retries)."""
    return {
        "open_retries": config.shard_open_retries,
        "retry_wait_s": config.shard_retry_wait_s,
    }


@dataclass(frozen=True)
class _WorkerBatch:
    """A batch as a worker hands it over: with that worker's stream state right after it."""

    batch: Batch
    worker: int  # the logical worker (see BucketedShardStream.rotation)
    state: dict[str, Any]  # StreamState's fields as JSON data

    def pin_memory(self) -> _WorkerBatch:
        # DataLoader(pin_memory=True) calls this: the batch's tensors are pinned, the state
        # (plain data) passes as it is.
        return replace(self, batch=self.batch.pin_memory())


class BucketedShardStream(IterableDataset):
    """One rank's infinite stream of bucketed batches (images or cached latents)."""

    def __init__(
        self,
        config: DataConfig,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
        mode: ShardKind,
    ):
        super().__init__()
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.batch_size = batch_size
        self.mode = mode
        spec = config.cache_shards if mode == "latents" else config.shards
        self.shards = expand_shards(spec)
        self.num_slots = world_size * self.num_workers
        if not config.resample and len(self.shards) < self.num_slots:
            raise ValueError(
                f"{len(self.shards)} shards for {self.num_slots} readers (world_size "
                f"{world_size} x num_workers {self.num_workers}): every reader needs at least "
                "one shard per epoch; reshard into more files, lower data.num_workers, or set "
                "data.resample=true"
            )
        families = bucket_families(config)
        self.buckets = families if mode == "images" else None
        self.families = families
        self.resolutions = families.resolutions
        self._batch_sizes = {
            r: micro_batch_for(r, batch_size, self.resolutions[0]) for r in self.resolutions
        }
        self.resume: dict[int, StreamState] = {}  # logical worker -> state to continue from
        self.rotation = 0  # DataLoader worker w serves logical worker (w + rotation) % W

    # -- per-sample work ----------------------------------------------------------------------

    def _item(self, ref: Ref, sample: dict) -> Sample:
        return decode_item(self.config, self.mode, self.buckets, ref, sample)

    def batch_size_of(self, bucket: Bucket) -> int:
        """How many samples make a batch of `bucket`: its family's micro batch."""
        if len(self.resolutions) == 1:
            return self.batch_size
        resolution = self.families.resolution_of(bucket)
        if resolution is None:  # only a cache made with other data settings gets here
            raise ValueError(
                f"cached sample bucket {bucket[0]}x{bucket[1]} belongs to none of "
                f"data.resolutions={list(self.resolutions)}; precompute the cache with this "
                "run's data section (mmdit-precompute)"
            )
        return self._batch_sizes[resolution]

    # -- the stream ---------------------------------------------------------------------------

    def _raw(self, slot: int, state: StreamState, counter: BadSampleCounter) -> Iterator:
        """(ref, sample) in shard order from the saved cursor on; None marks an epoch end."""
        while True:
            shards = slot_shards(
                self.shards,
                epoch=state.epoch,
                slot=slot,
                num_slots=self.num_slots,
                seed=self.config.seed,
                resample=self.config.resample,
            )
            while state.shard_pos < len(shards):
                url = shards[state.shard_pos]
                events = 0

                def on_bad(reason, _url, _key, _detail):
                    nonlocal events
                    events += 1
                    if events > state.shard_bad_events:  # not counted before a resume
                        counter.add_bad(reason)
                        state.shard_bad_events = events

                # An unopenable shard is retried first, then counted (one event) and
                # skipped like other bad data: the cursor moves on as for an empty shard.
                samples = iter_samples(url, on_bad=on_bad, **_retries(self.config))
                for index, sample in enumerate(samples):
                    if index < state.sample_pos:
                        continue  # taken before the resume; skipped without decoding
                    state.sample_pos = index + 1
                    yield (state.epoch, url, index), sample
                state.shard_pos += 1
                state.sample_pos = state.shard_bad_events = 0
            yield None
            state.epoch += 1
            state.shard_pos = 0

    def _worker_stream(self, logical: int) -> Iterator[_WorkerBatch]:
        slot = self.rank * self.num_workers + logical
        state = self.resume.get(logical) or StreamState()
        counter = BadSampleCounter(self.config.max_bad_fraction)
        counter.merge(state.bad)
        rng = random.Random(f"buffer:{self.config.seed}:{slot}")
        if state.rng is not None:
            rng.setstate(_rng_state_from_data(state.rng))
        restored = _fetch(
            state.buffer + [r for refs in state.pending.values() for r in refs], self.config
        )
        buffer: list[tuple[Ref, dict]] = [(r, restored[r]) for r in state.buffer]
        pending: dict[Bucket, list[tuple[Ref, Sample]]] = defaultdict(list)
        for refs in state.pending.values():
            for ref in refs:
                item = self._item(ref, restored[ref])
                pending[item.bucket].append((ref, item))

        def snapshot() -> dict:
            # Refs as lists: the state's JSON form, so a state taken here and one read back from
            # a checkpoint are equal data (from_dict turns them into tuples again).
            state.buffer = [list(ref) for ref, _ in buffer]
            state.pending = {
                f"{b[0]}x{b[1]}": [list(ref) for ref, _ in entries]
                for b, entries in pending.items()
                if entries
            }
            state.rng = _rng_state_to_data(rng.getstate())
            state.bad = counter.as_dict()
            # Shallow: the lists above are rebuilt for every snapshot, so nothing is shared.
            return {f.name: getattr(state, f.name) for f in fields(state)}

        def emit(ref: Ref, sample: dict) -> Iterator[_WorkerBatch]:
            try:
                item = self._item(ref, sample)
            except BadSample as e:
                counter.add_bad(e.reason)
                counter.check()
                return
            counter.add_good()
            queue = pending[item.bucket]
            queue.append((ref, item))
            if len(queue) == self.batch_size_of(item.bucket):
                entries = list(queue)
                queue.clear()
                batch = collate([it for _, it in entries], [r[0] for r, _ in entries])
                state.batches += 1
                yield _WorkerBatch(batch, logical, snapshot())

        size = max(1, self.config.shuffle_buffer)
        for entry in self._raw(slot, state, counter):
            if entry is None:  # epoch end: drain the buffer in random order
                while buffer:
                    yield from emit(*buffer.pop(rng.randrange(len(buffer))))
                continue
            buffer.append(entry)
            if len(buffer) >= size:
                yield from emit(*buffer.pop(rng.randrange(len(buffer))))

    def __iter__(self) -> Iterator[_WorkerBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self._worker_stream((worker + self.rotation) % self.num_workers)


class ResumableLoader:
    """Iterates batches from a BucketedShardStream; `state_dict()` marks the exact position."""

    def __init__(self, stream: BucketedShardStream, num_workers: int, pin_memory: bool = False):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.cache_info: CacheInfo | None = None
        self._states: dict[int, dict] = {}
        self._consumed = 0

    def __iter__(self) -> Iterator[Batch]:
        # Every new iteration continues from the last consumed batch, never from the start.
        self.stream.resume = {w: StreamState.from_dict(s) for w, s in self._states.items()}
        self.stream.rotation = self._consumed % self.stream.num_workers
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        for stamped in loader:
            self._states[stamped.worker] = stamped.state
            self._consumed += 1
            yield stamped.batch

    def bad_counts(self) -> dict[str, int]:
        """This rank's counts (good and per reason) over the consumed batches' workers."""
        total = BadSampleCounter()
        for state in self._states.values():
            total.merge(state["bad"])
        return total.as_dict()

    def _layout(self) -> dict[str, Any]:
        """What a saved position is only valid for (the slots and the batch sizes)."""
        layout = {
            "format": STATE_FORMAT,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "num_workers": self.stream.num_workers,
            "batch_size": self.stream.batch_size,
        }
        if len(self.stream.resolutions) > 1:  # one-resolution states stay as they were
            layout["resolutions"] = list(self.stream.resolutions)
        return layout

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._layout(),
            "consumed": self._consumed,
            "workers": {str(w): s for w, s in self._states.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = self._layout()
        if "resolutions" in state and "resolutions" not in expected:
            expected["resolutions"] = list(self.stream.resolutions)
        differing = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if differing:
            details = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in differing.items())
            raise ValueError(
                f"cannot resume the data stream exactly ({details}); resume with the same "
                "world size, data.num_workers, micro batch size and data.resolutions"
            )
        self._states = {int(w): dict(s) for w, s in state["workers"].items()}
        self._consumed = int(state["consumed"])


def reshard_state(
    rank_states: Sequence[Mapping[str, Any]], rank: int, world_size: int, num_workers: int
) -> dict[str, Any]:
    """Rank `rank`'s loader state for a new (world_size, num_workers) layout, from the states
    of every rank of the old layout.

    Each reader slot's stream depends only on the slot number and the total number of slots,
    so a layout with the same total (e.g. 2 ranks x 1 worker -> 1 rank x 2 workers, the
    trainer's world-size change at a fixed global batch) continues every slot exactly. Within
    a rank, workers are consumed round-robin, so worker w of a rank that consumed c batches
    has consumed c // W + (w < c % W) of them; the new rank's slots must again form that
    pattern (they do whenever ranks are merged or split whole).
    """
    if not rank_states:
        raise ValueError("no loader states to reshard")
    first = rank_states[0]
    old_world, old_workers = int(first["world_size"]), int(first["num_workers"])
    new_workers = max(1, num_workers)
    if old_world * old_workers != world_size * new_workers:
        raise ValueError(
            f"cannot continue the data stream on {world_size} ranks x {new_workers} workers: "
            f"it was read by {old_world} x {old_workers} = {old_world * old_workers} readers; "
            f"use data.num_workers = {old_world * old_workers} / world size"
        )
    by_rank = {int(s["rank"]): s for s in rank_states}
    if sorted(by_rank) != list(range(old_world)):
        raise ValueError(f"loader states for ranks {sorted(by_rank)}, expected 0..{old_world - 1}")
    slots: dict[int, tuple[int, dict | None]] = {}  # slot -> (batches consumed, state)
    for r, state in by_rank.items():
        if state.get("format") != STATE_FORMAT or state["batch_size"] != first["batch_size"]:
            raise ValueError("loader states differ in format or batch size across ranks")
        c = int(state["consumed"])
        for w in range(old_workers):
            consumed = c // old_workers + (1 if w < c % old_workers else 0)
            slots[r * old_workers + w] = (consumed, state["workers"].get(str(w)))
    mine = [slots[rank * new_workers + w] for w in range(new_workers)]
    counts = [c for c, _ in mine]
    lead = sum(1 for c in counts if c > counts[-1])
    if (
        any(c not in (counts[-1], counts[-1] + 1) for c in counts)
        or counts[:lead] != [counts[-1] + 1] * lead
    ):
        raise ValueError(
            f"rank {rank}'s readers consumed {counts} batches: not a round-robin position, so "
            "the stream cannot continue exactly on this layout"
        )
    out = {
        "format": STATE_FORMAT,
        "rank": rank,
        "world_size": world_size,
        "num_workers": new_workers,
        "batch_size": first["batch_size"],
        "consumed": sum(counts),
        "workers": {str(w): st for w, (_, st) in enumerate(mine) if st is not None},
    }
    if "resolutions" in first:
        out["resolutions"] = first["resolutions"]
    return out


def build_loader(
    config: DataConfig,
    rank: int,
    world_size: int,
    *,
    batch_size: int,
    expected_identity: Mapping[str, Any] | None = None,
    pin_memory: bool = False,
) -> ResumableLoader:
    """Images from `config.shards`, or cached latents when `config.cache_shards` is set.

    For a cache, `expected_identity` (mmdit.conditioning.conditioning_identity of the run's
    conditioning section) must match the cache's; a cache made with other encoders is refused.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    mode: ShardKind = "latents" if config.cache_shards else "images"
    if mode == "images" and not config.shards:
        raise ValueError("data.shards is empty: set it to a shard pattern, directory or list")
    stream = BucketedShardStream(
        config,
        rank=rank,
        world_size=world_size,
        num_workers=config.num_workers,
        batch_size=batch_size,
        mode=mode,
    )
    loader = ResumableLoader(stream, config.num_workers, pin_memory=pin_memory)
    if mode == "latents":
        from mmdit.conditioning import check_identity

        cache_dir = Path(stream.shards[0]).parent
        loader.cache_info = CacheInfo.load(cache_dir)
        if expected_identity is not None:
            check_identity(loader.cache_info.identity, expected_identity, f"cache {cache_dir}")
    return loader


__all__ = [
    "REASONS",
    "BucketedShardStream",
    "ResumableLoader",
    "StreamState",
    "build_loader",
    "reshard_state",
]
