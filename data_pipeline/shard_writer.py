"""WebDataset shards of image-caption pairs, written as img2dataset writes them (see
`mmdit-shards`, data_pipeline/shards.py, for the layout): each input validated, keyed, stored
with its metadata, shards rolled over by count and size and published atomically."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data_pipeline.bad_samples import BadSample, BadSampleCounter
from data_pipeline.images import decode_image
from mmdit.atomic_file import atomic_path, publish, temp_name

SUMMARY_NAME = "_write_summary.json"
# Stored image formats (PIL format -> member extension) written as-is without --reencode.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Item:
    """One input: an image path and its caption (None when missing)."""

    path: Path
    original_path: str
    caption: str | None


class _ShardSink:
    """Rolls over TarWriter shards by count and size; each shard is written to its temporary
    name (mmdit.atomic_file.temp_name) and published when closed."""

    def __init__(self, out: Path, prefix: str, max_count: int, max_bytes: int):
        self.out, self.prefix = out, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.digits = max(1, len(str(max_count - 1)))
        self.index = -1
        self.count = 0
        self.size = 0
        self.writer = None
        self.file = None
        self.tmp: Path | None = None
        self.shards: list[str] = []
        self.total_bytes = 0

    def name(self, index: int) -> str:
        return f"{self.prefix}{index:06d}.tar"

    def _open_next(self) -> None:
        import webdataset as wds

        self.close()
        self.index += 1
        self.tmp = temp_name(self.out / self.name(self.index))
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.writer = wds.TarWriter(self.file, encoder=False)
        self.count = 0
        self.size = 0

    def next_key(self) -> str:
        if self.writer is None or self.count >= self.max_count or self.size >= self.max_bytes:
            self._open_next()
        number = self.index * 10**self.digits + self.count
        return f"{self.prefix}{number:0{5 + self.digits}d}"

    def write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.count += 1
        self.size = self.file.tell()

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        final = self.out / self.name(self.index)
        publish(self.tmp, final)
        self.total_bytes += final.stat().st_size
        self.shards.append(final.name)
        self.writer = self.file = self.tmp = None

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()  # finish the tar stream into the .tmp file, then drop it
                self.file.close()
            finally:
                if self.tmp is not None and self.tmp.exists():
                    self.tmp.unlink()
            self.writer = self.file = self.tmp = None


def _encode_item(item: Item, reencode: str) -> tuple[bytes, str, int, int]:
    """Validated (image bytes to store, extension, width, height). Raises BadSample."""
    try:
        data = item.path.read_bytes()
    except OSError as e:
        raise BadSample("missing_image", f"{item.original_path}: {e.strerror or e}") from None
    img = decode_image(data, key=item.original_path)
    width, height = img.size
    if reencode == "jpg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg", width, height
    fmt = Image.open(io.BytesIO(data)).format
    ext = STORED_FORMATS.get(fmt or "")
    if ext is None:
        raise BadSample(
            "corrupt_image", f"{item.original_path}: {fmt} is not stored as-is; use --reencode jpg"
        )
    return data, ext, width, height


def write_shards(
    items: Iterator[Item],
    total: int,
    out: Path,
    *,
    prefix: str = "",
    source: str = "",
    max_count: int = 10000,
    max_size_mb: float = 1000.0,
    reencode: str = "none",
    progress: bool = True,
) -> dict:
    """Write `items` as shards in `out`; returns the summary (also saved as _write_summary.json)."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rejected = BadSampleCounter()
    sink = _ShardSink(out, prefix, max_count, int(max_size_mb * 1e6))
    bar = tqdm(items, total=total, desc="write", unit="img", disable=not progress)
    try:
        for item in bar:
            try:
                caption, (data, ext, width, height) = _accepted(item, reencode)
            except BadSample as e:
                rejected.add_bad(e.reason)
                bar.set_postfix(rejected=rejected.total_bad, refresh=False)
                continue
            key = sink.next_key()
            meta = _metadata(key, item, caption, data, width, height, source)
            sink.write(
                {
                    "__key__": key,
                    ext: data,
                    "txt": caption.encode("utf-8"),
                    "json": json.dumps(meta, indent=4).encode("utf-8"),
                }
            )
            rejected.add_good()
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    summary = {
        "out": str(out),
        "inputs": total,
        "written": rejected.good,
        "shards": len(sink.shards),
        "shard_names": sink.shards,
        "bytes": sink.total_bytes,
        "rejected": {r: n for r, n in rejected.as_dict().items() if r != "good" and n},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    with atomic_path(out / SUMMARY_NAME) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _accepted(item: Item, reencode: str) -> tuple[str, tuple[bytes, str, int, int]]:
    """(stripped caption, _encode_item's result) of an input fit to store. Raises BadSample,
    for the image first (missing, corrupt), then for the caption (missing, empty)."""
    caption = None if item.caption is None else item.caption.strip()
    encoded = _encode_item(item, reencode)
    if caption is None:
        raise BadSample("missing_caption", item.original_path)
    if not caption:
        raise BadSample("empty_caption", item.original_path)
    return caption, encoded


def _metadata(
    key: str, item: Item, caption: str, data: bytes, width: int, height: int, source: str
) -> dict:
    """The sample's {key}.json: img2dataset's common fields plus original_path and source."""
    return {
        "key": key,
        "caption": caption,
        "url": item.original_path,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "sha256": hashlib.sha256(data).hexdigest(),
        "original_path": item.original_path,
        "source": source,
    }
