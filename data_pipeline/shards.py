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

This module is the command: its inputs (an image folder or a table) and arguments; the writer
is data_pipeline/shard_writer.py, the report data_pipeline/shard_report.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import DataConfig
from data_pipeline.images import IMAGE_EXTENSIONS
from data_pipeline.shard_report import inspect_shards
from data_pipeline.shard_writer import SUMMARY_NAME, Item, write_shards
from data_pipeline.tar_samples import expand_shards

__all__ = ["SUMMARY_NAME", "Item", "inspect_shards", "main", "write_shards"]

CAPTION_SUFFIXES = (".txt", ".caption")


class InputError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# write: the inputs (an image folder or a table) -> Items -> shard_writer


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


def _cmd_write(args: argparse.Namespace) -> int:
    _check_write_args(args)
    total, items, source = _inputs(args)
    out: Path = args.out
    _check_out(out, args.prefix)
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


def _check_write_args(args: argparse.Namespace) -> None:
    if args.max_count < 1:
        raise InputError(f"--max-count {args.max_count} must be >= 1")
    if args.max_size_mb <= 0:
        raise InputError(f"--max-size-mb {args.max_size_mb} must be > 0")
    if args.prefix and not all(c.isalnum() or c in "-_" for c in args.prefix):
        raise InputError(f"--prefix {args.prefix!r}: use only letters, digits, '-' and '_'")


def _inputs(args: argparse.Namespace) -> tuple[int, Iterator[Item], str]:
    """(number of inputs, the inputs, their json 'source') from --images-dir or a table."""
    if args.images_dir is not None:
        if not args.images_dir.is_dir():
            raise InputError(f"--images-dir {args.images_dir}: no such directory")
        total, items = _images_dir_items(args.images_dir)
        return total, items, args.source or args.images_dir.name
    kind, path = next(
        (k, p) for k, p in (("csv", args.csv), ("tsv", args.tsv), ("parquet", args.parquet)) if p
    )
    if not path.is_file():
        raise InputError(f"--{kind} {path}: no such file")
    total, items = _table_items(path, kind, args.image_col, args.caption_col)
    return total, items, args.source or path.name


def _check_out(out: Path, prefix: str) -> None:
    """The output directory: absent, or a directory without shards of this prefix."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        clash = sorted(p.name for p in out.glob(f"{prefix}[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if clash:
            raise InputError(
                f"--out {out} already holds shards ({clash[0]}, ...); use an empty directory "
                "or a different --prefix"
            )


# ---------------------------------------------------------------------------------------------
# inspect


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
    _add_write_command(sub)
    _add_inspect_command(sub)
    return parser


def _add_write_command(sub) -> None:
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


def _add_inspect_command(sub) -> None:
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
