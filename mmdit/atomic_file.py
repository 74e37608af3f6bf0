"""Publishing files and directories so that a reader (or a crash) never sees half of one.

Everything is written under a temporary name beside its destination (same directory, so the
same filesystem and an atomic rename) and renamed into place only when complete; on an error
the temporary is removed and the destination is left as it was.

* ``write_atomic``: whole contents in memory (JSON, YAML, PNG bytes), fsynced before the rename.
* ``atomic_path``: for writers that take a path or stream into a file (safetensors, tar shards,
  diffusers folders); the caller fsyncs what must survive a power cut.
* ``atomic_directory``: a fresh empty directory to build a whole tree in.
* ``stage_file`` / ``temp_name`` + ``publish``: the two halves, for callers that must do
  something between writing and publishing (the checkpoint's ``latest`` pointer, a shard
  writer that rolls over files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary name ``path`` is written under: hidden, beside it, ending in ``.tmp``.
    Fixed per destination, so a rerun after a crash overwrites (reclaims) the stale one; one
    writer per destination at a time."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def remove(path: str | os.PathLike) -> None:
    """Delete a file, link or directory tree; nothing there is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the complete ``tmp`` (a file or a directory) to ``path``.

    A file replaces a file in one ``os.replace``. A rename cannot replace an existing directory
    (or put a directory over a file), so the old one is first moved into a fresh hidden trash
    directory beside it, ``tmp`` is renamed in (the old one is put back when that fails) and
    the trash is deleted: readers see the old tree or the new one, never a mix."""
    tmp, path = Path(tmp), Path(path)
    if not (path.exists() and (tmp.is_dir() or path.is_dir())):
        os.replace(tmp, path)
        return path
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.replace(path, trash / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(trash / path.name, path)  # put the old one back
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    return path


def stage_file(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` (str as UTF-8) to a new temporary file beside ``path`` (creating parent
    directories), fsynced unless ``fsync=False``, and return its name for ``publish``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it (unless ``fsync=False``:
    files rewritten every few seconds that a power cut may lose, like heartbeats), then
    ``os.replace`` it in."""
    tmp = stage_file(path, data, fsync=fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``temp_name(path)`` (cleared of a crashed run's leftover, parents created) for the
    caller to create a file or directory at; on a clean exit it is published at ``path``, on
    an exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    remove(tmp)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        remove(tmp)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh empty directory beside ``path`` (a unique ``.NAME.tmp-*``) to build a tree
    in; on a clean exit it replaces ``path`` (see ``publish``), on an exception it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_SUFFIX}-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
