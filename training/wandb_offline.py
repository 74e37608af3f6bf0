"""W&B's offline run files read back: which steps a run's `.wandb` files already hold.

An offline run (train.wandb_mode=offline, the mode for clusters without internet) writes
RUN/wandb/offline-run-<time>-<id>/run-<id>.wandb, one directory per process that opened the
run; `wandb sync` uploads them later. A job killed with kill -9 leaves a file that ends early:
wandb keeps a step's row open until the next step (or finish) arrives, so the last steps
logged before the kill are not in it. MetricsLogger reads these files on resume to replay the
steps W&B lacks from metrics.jsonl, and to skip the ones it has.

The file is wandb's transaction log: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB-log
style 32 KiB blocks of chunks (crc32, length, type FULL/FIRST/MIDDLE/LAST) carrying serialized
`wandb.proto.wandb_internal_pb2.Record` messages. wandb >= 0.19 no longer ships a Python
reader (its Go core reads them), so this one follows the format: it stops at the first torn or
corrupt chunk, which is where a killed writer stopped.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
IDENT, MAGIC = b":W&B", 0xBEE1
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str | Path) -> Iterator[bytes]:
    """The serialized records of one .wandb file, up to the first torn or corrupt chunk."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        return
    ident, magic, _version = HEADER.unpack_from(data)
    if ident != IDENT or magic != MAGIC:
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    pos, pending = HEADER.size, None
    while pos + CHUNK.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK.size:  # a block's tail too small for a chunk header is padding
            pos += room
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += room  # zero padding up to the next block
            continue
        body = data[pos + CHUNK.size : pos + CHUNK.size + length]
        if len(body) < length or crc != zlib.crc32(body, zlib.crc32(bytes([kind]))):
            return  # torn by a kill mid-write
        pos += CHUNK.size + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE and pending is not None:
            pending += body
        elif kind == LAST and pending is not None:
            yield pending + body
            pending = None


def records(path: str | Path):
    """`wandb_internal_pb2.Record`s of one .wandb file."""
    from wandb.proto import wandb_internal_pb2

    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def run_files(wandb_dir: str | Path, run_id: str) -> list[Path]:
    """The run's .wandb files under `wandb_dir` (RUN/wandb), oldest first."""
    found = Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    return sorted(found, key=lambda p: p.parent.name)  # the name starts with its start time


def history(path: str | Path) -> dict[int, dict[str, str]]:
    """{step: {metric name: JSON value}} of the history rows in one .wandb file."""
    rows: dict[int, dict[str, str]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            item.key or "/".join(item.nested_key): item.value_json for item in record.history.item
        }
        rows[int(record.history.step.num)] = items
    return rows


def last_step(wandb_dir: str | Path, run_id: str) -> int:
    """The highest step any of the run's offline files holds (-1 when none)."""
    return max((max(history(p), default=-1) for p in run_files(wandb_dir, run_id)), default=-1)
