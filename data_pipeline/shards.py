"""`mmdit-shards`: write image-caption WebDataset shards, and inspect existing ones.

``mmdit-shards write`` packs an image folder (captions in ``<stem>.txt`` / ``<stem>.caption``
sidecars) or a CSV/TSV/parquet table of image paths and captions into standard WebDataset
shards ``DIR/{prefix}000000.tar, 000001.tar, ...`` with webdataset's own `TarWriter`, laid out
like img2dataset's output so one loader reads both:

- ``{key}.jpg|png|webp``: the original image bytes (extension from the real format, not the
  file name), or a quality-95 JPEG with ``--reencode jpg``;
- ``{key}.txt``: the caption (stripped);
- ``{key}.json``: img2dataset's common fields: ``key``, ``caption``, ``url`` (the input path
  as given), ``status`` ("success"), ``error_message`` (null), ``width``, ``height``,
  ``original_width``, ``original_height``, ``sha256`` of the stored image bytes, plus
  ``original_path`` and ``source`` (``--source``).

Keys follow img2dataset: ``shard_index * 10**d + i`` zero-padded to ``5 + d`` digits, where
``d`` is the number of digits of ``max_count - 1`` (``--max-count 10000``: shard 0 holds
``000000000`` .. ``000009999``, shard 1 starts at ``000010000``), prefixed by ``--prefix``.
Keys are unique over the whole output and never contain a dot or a slash.

Inputs that cannot be used are rejected, counted per reason and never written:
``missing_image`` (file missing / unreadable), ``corrupt_image`` (does not decode, or a format
other than JPEG/PNG/WEBP without ``--reencode jpg``), ``missing_caption``, ``empty_caption``.
Each shard is written to ``.NNNNNN.tar.tmp`` and renamed when complete, so a crash never leaves
a half shard under a final name. The summary is printed and saved as ``DIR/_write_summary.json``.

``mmdit-shards inspect PATTERN`` reads shards (brace pattern, directory, list file; img2dataset
output directories as they are) with the same safe reader the training loader uses and prints a
JSON report: samples, decodable images, captions, image sizes, aspect ratios, formats and bad
samples per reason.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data_pipeline.bad_samples import BadSample, BadSampleCounter
from data_pipeline.config import DataConfig
from data_pipeline.images import IMAGE_EXTENSIONS, decode_image
from data_pipeline.tar_samples import expand_shards, iter_samples, parse_sample
from mmdit.atomic_file import atomic_path, publish, temp_name

SUMMARY_NAME = "_write_summary.json"
CAPTION_SUFFIXES = (".txt", ".caption")
# Stored image formats (PIL format -> member extension) written as-is without --reencode.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Aspect ratio (width / height) histogram bins: [lo, hi).
ASPECT_BINS: tuple[tuple[str, float, float], ...] = (
    ("<0.50", 0.0, 0.5),
    ("0.50-0.75", 0.5, 0.75),
    ("0.75-0.91", 0.75, 0.91),
    ("0.91-1.10", 0.91, 1.10),
    ("1.10-1.33", 1.10, 1.34),  # 4:3 (1.333...) falls in this bin
    ("1.33-2.00", 1.34, 2.0),
    (">=2.00", 2.0, math.inf),
)


class InputError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# write


@dataclass
class Item:
    """One input: an image path and its caption (None when missing)."""

    path: Path
    original_path: str
    caption: str | None


def _images_dir_items(root: Path) -> tuple[int, Iterator[Item]]:
    images = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )

    def gen() -> Iterator[Item]:
        for p in images:
            caption = None
            for suffix in CAPTION_SUFFIXES:
                side = p.with_suffix(suffix)
                if side.is_file():
                    caption = side.read_text(encoding="utf-8", errors="replace")
                    break
            yield Item(p, p.relative_to(root).as_posix(), caption)

    return len(images), gen()


def _table_rows(path: Path, kind: str) -> tuple[list[str], list[dict]]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _table_items(path: Path, kind: str, image_col: str, caption_col: str):
    try:
        columns, rows = _table_rows(path, kind)
    except Exception as e:
        raise InputError(f"cannot read {kind} table {path}: {type(e).__name__}: {e}") from None
    missing = [c for c in (image_col, caption_col) if c not in columns]
    if missing:
        raise InputError(
            f"{path}: no column {', '.join(map(repr, missing))} (columns: "
            f"{', '.join(columns) or 'none'}); pass --image-col / --caption-col"
        )
    base = path.parent

    def gen() -> Iterator[Item]:
        for row in rows:
            raw = row.get(image_col)
            rel = "" if raw is None else str(raw)
            cap = row.get(caption_col)
            yield Item(base / rel if rel else base, rel, None if cap is None else str(cap))

    return len(rows), gen()


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
            caption = None if item.caption is None else item.caption.strip()
            try:
                data, ext, width, height = _encode_item(item, reencode)
                if caption is None:
                    raise BadSample("missing_caption", item.original_path)
                if not caption:
                    raise BadSample("empty_caption", item.original_path)
            except BadSample as e:
                rejected.add_bad(e.reason)
                bar.set_postfix(rejected=rejected.total_bad, refresh=False)
                continue
            key = sink.next_key()
            meta = {
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


def _cmd_write(args: argparse.Namespace) -> int:
    if args.max_count < 1:
        raise InputError(f"--max-count {args.max_count} must be >= 1")
    if args.max_size_mb <= 0:
        raise InputError(f"--max-size-mb {args.max_size_mb} must be > 0")
    if args.prefix and not all(c.isalnum() or c in "-_" for c in args.prefix):
        raise InputError(f"--prefix {args.prefix!r}: use only letters, digits, '-' and '_'")
    if args.images_dir is not None:
        if not args.images_dir.is_dir():
            raise InputError(f"--images-dir {args.images_dir}: no such directory")
        total, items = _images_dir_items(args.images_dir)
        source = args.source or args.images_dir.name
    else:
        kind, path = next(
            (k, p)
            for k, p in (("csv", args.csv), ("tsv", args.tsv), ("parquet", args.parquet))
            if p
        )
        if not path.is_file():
            raise InputError(f"--{kind} {path}: no such file")
        total, items = _table_items(path, kind, args.image_col, args.caption_col)
        source = args.source or path.name
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        clash = sorted(p.name for p in out.glob(f"{args.prefix}[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if clash:
            raise InputError(
                f"--out {out} already holds shards ({clash[0]}, ...); use an empty directory "
                "or a different --prefix"
            )
    summary = write_shards(
        items,
        total,
        out,
        prefix=args.prefix,
        source=source,
        max_count=args.max_count,
        max_size_mb=args.max_size_mb,
        reencode=args.reencode,
        progress=not args.quiet,
    )
    rejected = ", ".join(f"{r}={n}" for r, n in summary["rejected"].items()) or "none"
    print(
        f"wrote {summary['written']} of {summary['inputs']} samples in {summary['shards']} "
        f"shards ({summary['bytes'] / 1e6:.2f} MB) to {out} in {summary['seconds']:.1f} s; "
        f"rejected: {rejected}; summary: {out / SUMMARY_NAME}",
        flush=True,
    )
    return 0


# ---------------------------------------------------------------------------------------------
# inspect


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _aspect_bin(ratio: float) -> str:
    for label, lo, hi in ASPECT_BINS:
        if lo <= ratio < hi:
            return label
    return ASPECT_BINS[-1][0]


def inspect_shards(
    urls: list[str],
    *,
    max_samples: int | None = None,
    caption: str = "txt",
    empty_caption: str = "skip",
    progress: bool = True,
) -> dict:
    """Read shards with the training loader's reader and rules; returns the report dict.

    `bad` holds one count per skipped sample (and per bad shard) by reason, exactly what the
    loader would count; `good` = samples the loader would train on."""
    t0 = time.perf_counter()
    counter = BadSampleCounter()
    samples = decodable = 0
    captions = Counter({"present": 0, "empty": 0, "missing": 0})
    formats: Counter[str] = Counter()
    widths: list[int] = []
    heights: list[int] = []
    aspect = Counter({label: 0 for label, _, _ in ASPECT_BINS})
    problem_shards: list[dict] = []
    examples: list[dict] = []

    def on_bad(reason: str, url: str, key: str, detail: str) -> None:
        if reason in ("truncated_tar", "unreadable_shard"):
            problem_shards.append({"url": url, "reason": reason, "detail": detail})
        elif len(examples) < 20:
            examples.append({"url": url, "key": key, "reason": reason, "detail": detail})

    bar = tqdm(urls, desc="inspect", unit="shard", disable=not progress, file=sys.stderr)
    for url in bar:
        if max_samples is not None and samples >= max_samples:
            break
        for sample in iter_samples(url, counter, on_bad=on_bad):
            samples += 1
            try:
                parsed = parse_sample(sample, caption=caption, empty_caption="keep")
                captions["empty" if not parsed["caption"] else "present"] += 1
                img = decode_image(parsed["image_bytes"], key=parsed["key"])
                decodable += 1
                w, h = img.size
                widths.append(w)
                heights.append(h)
                aspect[_aspect_bin(w / h)] += 1
                formats[parsed["image_ext"]] += 1
                if not parsed["caption"] and empty_caption == "skip":
                    raise BadSample("empty_caption", parsed["key"])
                counter.add_good()
            except BadSample as e:
                if e.reason == "missing_caption":
                    captions["missing"] += 1
                counter.add_bad(e.reason)
                if len(examples) < 20:
                    examples.append(
                        {
                            "url": url,
                            "key": sample["__key__"],
                            "reason": e.reason,
                            "detail": e.detail,
                        }
                    )
            bar.set_postfix(samples=samples, bad=counter.total_bad, refresh=False)
            if max_samples is not None and samples >= max_samples:
                break
    bar.close()
    return {
        "shards": len(urls),
        "samples": samples,
        "good": counter.good,
        "decodable_images": decodable,
        "captions": dict(captions),
        "formats": dict(formats),
        "width": _stats(widths),
        "height": _stats(heights),
        "aspect_ratio_histogram": dict(aspect),
        "bad": counter.as_dict(),
        "bad_total": counter.total_bad,
        "problem_shards": problem_shards,
        "bad_examples": examples,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.max_samples is not None and args.max_samples < 1:
        raise InputError(f"--max-samples {args.max_samples} must be >= 1")
    try:
        DataConfig(caption=args.caption)
    except ValueError as e:
        raise InputError(f"--caption {args.caption!r}: {e}") from None
    try:
        urls = expand_shards(args.pattern)
    except ValueError as e:
        raise InputError(str(e)) from None
    report = inspect_shards(
        urls,
        max_samples=args.max_samples,
        caption=args.caption,
        empty_caption=args.empty_caption,
        progress=not args.quiet,
    )
    report = {"pattern": args.pattern, **report}
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmdit-shards",
        description=(
            "Write image-caption WebDataset shards (the layout img2dataset writes: "
            "KEY.jpg/png/webp, KEY.txt caption, KEY.json metadata) and inspect existing shards "
            "with the training loader's safe reader (no unpickling, unsafe keys skipped, "
            "truncated tars counted)."
        ),
        epilog="Run `mmdit-shards write --help` or `mmdit-shards inspect --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{write,inspect}")

    w = sub.add_parser(
        "write",
        help="pack images + captions into NNNNNN.tar shards",
        description=(
            "Pack images and captions into WebDataset shards OUT/{prefix}000000.tar, ... "
            "(atomic per shard). Inputs with a missing/undecodable image or a missing/empty "
            "caption are rejected and counted per reason; the summary is printed and saved as "
            f"OUT/{SUMMARY_NAME}."
        ),
        epilog=(
            "Examples: mmdit-shards write --out shards/ --images-dir photos/  (captions in "
            "photos/NAME.txt or NAME.caption);  mmdit-shards write --out shards/ --csv "
            "data.csv --image-col file --caption-col text  (paths relative to the csv's folder)."
        ),
    )
    w.add_argument("--out", required=True, type=Path, help="output directory (created)")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images-dir", type=Path, help="folder of images with same-stem .txt/.caption captions"
    )
    src.add_argument("--csv", type=Path, help="CSV table of image paths and captions")
    src.add_argument("--tsv", type=Path, help="TSV table of image paths and captions")
    src.add_argument("--parquet", type=Path, help="parquet table of image paths and captions")
    w.add_argument(
        "--image-col", default="path", help="table column of image paths (default: path)"
    )
    w.add_argument(
        "--caption-col", default="caption", help="table column of captions (default: caption)"
    )
    w.add_argument(
        "--max-count", type=int, default=10000, help="samples per shard (default: 10000)"
    )
    w.add_argument(
        "--max-size-mb",
        type=float,
        default=1000.0,
        help="start a new shard once one reaches this size in MB (default: 1000)",
    )
    w.add_argument(
        "--prefix", default="", help="prefix of shard file names and keys (default: none)"
    )
    w.add_argument("--source", default="", help="json 'source' field (default: the input's name)")
    w.add_argument(
        "--reencode",
        choices=("none", "jpg"),
        default="none",
        help="none: store the original bytes (default); jpg: re-encode as quality-95 JPEG",
    )
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=_cmd_write)

    i = sub.add_parser(
        "inspect",
        help="report samples, image sizes, captions and bad samples of shards",
        description=(
            "Read shards with the training loader's reader and print a JSON report: samples, "
            "decodable images, captions present/empty/missing, image sizes, aspect-ratio "
            "histogram, formats, and bad samples per reason. Progress goes to stderr."
        ),
        epilog=(
            "PATTERN: a brace pattern ('/data/{000000..000099}.tar'), a directory (its *.tar; "
            "img2dataset's .parquet/_stats.json files are ignored), a .txt/.shards list file, "
            "a comma-separated list, or URLs (pipe:, s3://)."
        ),
    )
    i.add_argument("pattern", help="shards to read (see below)")
    i.add_argument("--out", type=Path, help="also write the report to this JSON file")
    i.add_argument("--max-samples", type=int, help="stop after this many samples")
    i.add_argument(
        "--caption", default="txt", help="caption source: txt or json:<field> (default: txt)"
    )
    i.add_argument(
        "--empty-caption",
        choices=("skip", "keep"),
        default="skip",
        help="count empty captions as bad (skip, default) or as good (keep)",
    )
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"mmdit-shards {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
