"""A safe, counting reader of WebDataset tar shards (used by `mmdit-shards inspect` and the loader).

`iter_samples(url, counter)` streams one shard with Python's `tarfile` (mode ``r|*``, so plain,
gzip, bz2 and xz tars all work and nothing is seeked) over whatever `webdataset.gopen` opens:
local paths, ``file:``, ``pipe:<command>`` and fsspec/curl URLs. Members are grouped into
samples the way webdataset does it: consecutive members whose names share a key (the member
name up to the first dot of its last path component) form one sample, and the rest of the name,
lower-cased, is the extension (``000001.JPG`` -> key ``000001``, extension ``jpg``).

What it never does, and what it counts instead (`BadSampleCounter` reasons):

- ``forbidden_member``: members with a pickle-bearing extension (``pyd``, ``pkl``, ``pickle``,
  ``pth``, also as the last part of a longer extension like ``seg.pyd``) are skipped unread and
  never unpickled. Counted once per sample however many such members it has; the sample itself
  is still yielded without them and is usable if it has an image and a caption.
- ``unsafe_key``: a key that is empty, absolute (leading ``/``), holds a backslash or has an
  empty, ``.`` or ``..`` path component: the whole sample is skipped (counted once) and its key
  is never used to build a path. Keys with ordinary sub-directories (``part1/000001``) are fine.
- ``truncated_tar``: the tar ends mid-member or mid-header, or without its end-of-archive
  blocks. The complete samples before the cut are yielded; the sample being assembled when
  the cut is found is dropped (it may be incomplete), one ``truncated_tar`` is counted and the
  shard ends there.
- ``unreadable_shard``: the shard cannot be opened or is not a tar at all (missing file, empty
  or garbage bytes, failed ``pipe:`` command): counted, nothing yielded, no exception.

Directories, links and other non-regular members are skipped silently. If a key repeats an
extension inside one sample, the first member wins and the repeat is ignored.

Retries: with ``open_retries=N`` an open that fails with an ``OSError`` (the file vanished,
permission denied, an I/O error while reading the first header: what an NFS or object-store
hiccup looks like) is tried N more times, ``retry_wait_s`` apart, before it counts as
``unreadable_shard``. Bytes that are not a tar are not retried (they will not change), nor is
anything after the first header: an error mid-shard stays ``truncated_tar`` with the samples
before it kept, so the sample positions the training loader resumes from never shift. The
default is no retry, no sleep: `mmdit-shards inspect` reports what is there now.

`expand_shards(spec)` turns a shard spec (brace pattern, directory, list file, comma list) into
URLs; `parse_sample(sample)` picks the image bytes, caption and metadata of one sample without
decoding the image (decoding happens in the loader's workers).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from braceexpand import braceexpand
from webdataset.gopen import gopen

from data_pipeline.bad_samples import BadSample, BadSampleCounter
from data_pipeline.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# Pickle-bearing member extensions: never read, never unpickled.
FORBIDDEN_EXTENSIONS: frozenset[str] = frozenset({"pyd", "pkl", "pickle", "pth"})
# Local list files holding one shard per line.
LIST_SUFFIXES: tuple[str, ...] = (".txt", ".shards")

# Called for every bad event iter_samples counts: (reason, url, key, detail).
OnBad = Callable[[str, str, str, str], None]


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec or spec.startswith("file:")


def _split_top_level_commas(spec: str) -> list[str]:
    """Split on commas that are not inside a brace pattern (``{a,b}`` stays whole)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def _read_list_file(path: Path) -> list[str]:
    """Shards listed one per line; blank lines and '#' comments ignored; relative local entries
    are relative to the list file's directory; each line may be a brace pattern or a URL."""
    urls: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for item in braceexpand(line):
            if _is_url(item) or os.path.isabs(item):
                urls.append(item)
            else:
                urls.append(str(path.parent / item))
    return urls


def _expand_one(spec: str) -> list[str]:
    if _is_url(spec):
        return list(braceexpand(spec))  # passed through unchecked: gopen opens them
    path = Path(spec)
    if path.is_dir():
        # Only the tars: img2dataset puts .parquet and _stats.json files beside them.
        urls = sorted(str(p) for p in path.iterdir() if p.name.endswith(".tar") and p.is_file())
        if not urls:
            raise ValueError(f"shard spec {spec!r}: directory has no *.tar files")
        return urls
    if path.is_file() and path.suffix in LIST_SUFFIXES:
        urls = _read_list_file(path)
        if not urls:
            raise ValueError(f"shard spec {spec!r}: list file names no shards")
        return urls
    if path.is_file():
        return [spec]
    urls = list(braceexpand(spec))
    if "{" in spec and any(os.path.exists(u) for u in urls):
        # Shards of a pattern that are missing are kept: reading counts them as
        # `unreadable_shard` instead of silently shrinking the data set.
        return urls
    raise ValueError(
        f"shard spec {spec!r} matches nothing: give an existing .tar file, a brace pattern "
        "like /data/{000000..000099}.tar, a directory of .tar files, a .txt/.shards list file, "
        "or a URL (pipe:, s3://, https://)"
    )


def expand_shards(spec: str) -> list[str]:
    """Shard URLs for a spec: a brace pattern, a directory (its *.tar, sorted), a text file
    listing one shard per line (.txt / .shards), a single tar, a URL, or a comma-separated list
    of any of these. URLs and ``pipe:`` commands are brace-expanded and passed through unchecked.

    Raises ValueError naming the spec when it is empty or matches nothing locally."""
    if not spec or not spec.strip():
        raise ValueError("shard spec is empty: give a brace pattern, a directory or a list file")
    urls: list[str] = []
    for part in _split_top_level_commas(spec.strip()):
        urls.extend(_expand_one(part))
    if not urls:
        raise ValueError(f"shard spec {spec!r} matches nothing")
    return urls


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset-style (key, extension): key = name up to the first dot of the last path
    component, extension = the rest, lower-cased ('' when there is no dot)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def is_safe_key(key: str) -> bool:
    """False for keys that could escape a directory if ever joined into a path."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


def is_forbidden_extension(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1] in FORBIDDEN_EXTENSIONS


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records why `tarfile` stopped reading headers: in stream mode a header cut short (or a
    missing end-of-archive block) ends iteration silently instead of raising."""

    @classmethod
    def fromtarfile(cls, tarfile_obj):
        try:
            return super().fromtarfile(tarfile_obj)
        except tarfile.HeaderError as e:
            tarfile_obj._mmdit_end_error = e
            raise


class _Sample:
    __slots__ = ("forbidden", "key", "members", "unsafe")

    def __init__(self, key: str):
        self.key = key
        self.members: dict[str, bytes] = {}
        self.forbidden = False
        self.unsafe = not is_safe_key(key)


def iter_samples(
    url: str,
    counter: BadSampleCounter | None = None,
    *,
    on_bad: OnBad | None = None,
    open_retries: int = 0,
    retry_wait_s: float = 1.0,
) -> Iterator[dict]:
    """Yield the samples of one shard as ``{"__key__", "__url__", ext: bytes, ...}`` dicts.

    Bad events are added to `counter` (see the module docstring for the rules) and passed to
    `on_bad(reason, url, key, detail)` when given; nothing is raised for bad data. An open
    that fails with an OSError is retried `open_retries` times, `retry_wait_s` apart, before
    the shard counts as unreadable (one event, however many tries)."""
    if open_retries < 0 or retry_wait_s < 0:
        raise ValueError(
            f"open_retries={open_retries} and retry_wait_s={retry_wait_s} must be >= 0"
        )

    def bad(reason: str, key: str = "", detail: str = "") -> None:
        if counter is not None:
            counter.add_bad(reason)
        if on_bad is not None:
            on_bad(reason, url, key, detail)
        level = (
            logging.WARNING if reason in ("truncated_tar", "unreadable_shard") else logging.DEBUG
        )
        log.log(level, "%s: %s %s %s", reason, url, key, detail)

    def finish(sample: _Sample) -> dict | None:
        if sample.unsafe:
            bad("unsafe_key", repr(sample.key), "key has a path component")
            return None
        if sample.forbidden:
            bad("forbidden_member", sample.key, "pickle-bearing member skipped unread")
        return {"__key__": sample.key, "__url__": url, **sample.members}

    opened = _open_tar(url, open_retries, retry_wait_s)
    if isinstance(opened, str):
        bad("unreadable_shard", detail=opened)
        return
    stream, tar = opened
    current: _Sample | None = None
    try:
        try:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_member_name(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        done = finish(current)
                        if done is not None:
                            yield done
                    current = _Sample(key)
                if current.unsafe:
                    continue  # never read
                if is_forbidden_extension(ext):
                    current.forbidden = True  # dropped unread, never unpickled
                    continue
                if ext in current.members:
                    continue  # repeated extension: the first member wins
                fileobj = tar.extractfile(member)
                current.members[ext] = fileobj.read() if fileobj is not None else b""
            end_error = getattr(tar, "_mmdit_end_error", None)
            if isinstance(end_error, (tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError)):
                raise tarfile.ReadError(f"tar ends without its end-of-archive block ({end_error})")
        except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
            bad("truncated_tar", current.key if current else "", f"{type(e).__name__}: {e}")
            return
        if current is not None:
            done = finish(current)
            if done is not None:
                yield done
    finally:
        _close_quietly(stream, url)


def _open_tar(url: str, retries: int, wait_s: float):
    """(stream, TarFile) positioned after the first header, or why the shard cannot be read.

    Only OSErrors are retried: a missing or unreadable file may come back (NFS, a sync job
    replacing it, an object store's brief outage); bytes that are not a tar will not."""
    attempt = 0
    while True:
        stream = None
        try:
            stream = gopen(url, "rb")
            # `stream` (not the TarFile) owns the file; the caller closes it. 1 MiB reads:
            # tarfile's default 10 KiB records cost ~100 calls per cached sample. Opening
            # reads the first header, so an I/O error there is an open failure too.
            tar = tarfile.open(  # noqa: SIM115
                fileobj=stream, mode="r|*", tarinfo=_EndTrackingTarInfo, bufsize=1 << 20
            )
            return stream, tar
        except Exception as e:  # missing file, bad scheme, not a tar: never raise for a shard
            _close_quietly(stream, url)
            detail = f"{type(e).__name__}: {e}"
            if not isinstance(e, OSError) or attempt >= retries:
                if attempt:
                    detail += f" (after {attempt + 1} tries, {wait_s:g} s apart)"
                return detail
            attempt += 1
            log.warning(
                "cannot open shard %s (%s); try %d of %d in %g s",
                url,
                detail,
                attempt + 1,
                retries + 1,
                wait_s,
            )
            time.sleep(wait_s)


def _close_quietly(stream, url: str) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except Exception as e:  # a pipe: command that exited non-zero: already counted
        log.debug("closing %s: %s", url, e)


def _caption_from(sample: dict, caption: str, meta: dict | None) -> str:
    key = sample.get("__key__", "")
    if caption == "txt":
        raw = sample.get("txt")
        if raw is None:
            raise BadSample("missing_caption", f"{key}: no txt member")
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise BadSample("missing_caption", f"{key}: txt member is not UTF-8 ({e})") from None
    field = caption[len("json:") :]
    if meta is None:
        raise BadSample("missing_caption", f"{key}: no json member for caption={caption!r}")
    value = meta.get(field)
    if value is None:
        raise BadSample("missing_caption", f"{key}: json has no {field!r} field")
    if not isinstance(value, str):
        raise BadSample("missing_caption", f"{key}: json field {field!r} is not a string")
    return value.strip()


def parse_sample(sample: dict, *, caption: str = "txt", empty_caption: str = "skip") -> dict:
    """Pick the image member, caption and metadata of one sample from `iter_samples`.

    Returns ``{"key", "url", "image_bytes", "image_ext", "caption", "meta"}``; the image is not
    decoded. Checks in this order, raising `BadSample`: ``missing_image`` (none of
    IMAGE_EXTENSIONS), ``bad_json`` (a json member that does not parse or is not an object),
    ``missing_caption`` (no ``txt`` member / json field, or not text), ``empty_caption`` (blank
    after stripping, only when ``empty_caption == "skip"``; with ``"keep"`` it is returned as
    "")."""
    if not (caption == "txt" or (caption.startswith("json:") and len(caption) > 5)):
        raise ValueError(f"caption={caption!r} must be 'txt' or 'json:<field>'")
    if empty_caption not in ("skip", "keep"):
        raise ValueError(f"empty_caption={empty_caption!r} must be 'skip' or 'keep'")
    key = sample.get("__key__", "")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None:
        raise BadSample("missing_image", f"{key}: no {'/'.join(IMAGE_EXTENSIONS)} member")
    meta: dict | None = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadSample("bad_json", f"{key}: {e}") from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"{key}: json is a {type(meta).__name__}, not an object")
    text = _caption_from(sample, caption, meta)
    if not text and empty_caption == "skip":
        raise BadSample("empty_caption", f"{key}: caption is blank")
    return {
        "key": key,
        "url": sample.get("__url__", ""),
        "image_bytes": sample[image_ext],
        "image_ext": image_ext,
        "caption": text,
        "meta": meta if meta is not None else {},
    }
