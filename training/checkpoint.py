"""Checkpoints that are published atomically, validated by every rank, and found by themselves.

This module writes the layout and reads back what only the trainer reads (its per-rank state,
and the manifest's CRCs before a resume); the layout's names, the manifest's format and every
other reader are in mmdit/checkpoints.py.

Publication: every rank writes into the `.tmp_` directory; their file checksums are gathered
to rank 0, which writes the manifest, renames the directory into place and replaces `latest`
(both `os.replace`, atomic on POSIX). A crash at any point leaves either the previous
checkpoint or the new one, never half of one.

A failed write (disk full, quota, I/O error) on any rank, in DeepSpeed's shards, the EMA,
the per-rank state, the manifest or `latest`, fails the whole checkpoint on every rank
together: `save` raises `CheckpointWriteError` on all ranks after they agree, the temporary
directory is removed (best effort; a leftover is removed on the next start) and never
published, and `latest`, the older checkpoints and their rotation are untouched. What the run
does next is the trainer's decision (`faults.on_checkpoint_error`).

Resume: the newest checkpoint whose manifest every rank agrees is intact (each rank checks the
sizes of all files and the CRCs of those it will read) is loaded; a damaged one is skipped for
its predecessor, and no rank starts loading until all agree, so a bad shard cannot leave the
other ranks waiting in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdit import distributed
from mmdit.atomic_file import atomic_path, stage_file, write_atomic
from mmdit.checkpoints import (
    CONFIG_FILE,
    DS_TAG,
    LATEST,
    MANIFEST,
    STEP_DIR,
    TMP_PREFIX,
    UNIVERSAL_TAG,
    checkpoints_dir,
    client_file_name,
    crc32_file,
    read_manifest,
    step_dir_name,
    write_manifest,
)

log = logging.getLogger(__name__)

_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|_rank_)(\d+)")


class CheckpointWriteError(Exception):
    """A checkpoint that could not be written. Raised on every rank together, with every
    failed rank's error, after nothing of it was published."""

    def __init__(self, step: int, path: Path, failures: dict[int, str]):
        self.step, self.path, self.failures = step, path, failures
        super().__init__(f"checkpoint of step {step} not written to {path}: {self.errors()}")

    def errors(self) -> str:
        """`rank 1: writing ...: OSError: [Errno 28] No space left on device (0.0 MiB free)`"""
        return "; ".join(f"rank {r}: {e}" for r, e in sorted(self.failures.items()))


class _WriteFailures:
    """This rank's first failed write during one save, as "what: Type: message (free space)".

    Writes are attempted until one fails; after that they are skipped (writing more would only
    fill the disk further), but the caller still reaches every collective, so the ranks can
    agree afterwards. The free space is taken at the failure, because torch's zip writer
    reports a full disk only as "unexpected pos N vs M"."""

    def __init__(self, tmp: Path):
        self.tmp = tmp  # named once in the report; the files in it by their relative names
        self.first: str | None = None

    def attempt(self, what: str, write, *args, **kwargs):
        if self.first is not None:
            return None
        try:
            return write(*args, **kwargs)
        except Exception as e:  # ENOSPC arrives as OSError, RuntimeError or SafetensorError
            message = " ".join(f"{what}: {type(e).__name__}: {e}".split())
            self.first = message.replace(f"{self.tmp}/", "")[:600] + self._space()
            return None

    def _space(self) -> str:
        free = free_bytes(self.tmp)
        if free is None:
            return ""
        if free < 2**20:
            return f" (file system full: {free / 2**20:.1f} MiB free)"
        return f" ({free / 2**20:.1f} MiB free on its file system)"


class _GuardedDeepSpeedWrites:
    """During `engine.save_checkpoint`, a failed file write on this rank is recorded in
    `failures` instead of raised.

    DeepSpeed's save runs collectives between and after its writes (0.19: a barrier after
    making the directory, two all-reduces checking the tag, a barrier at the end); a rank that
    raised out of it would leave the others waiting in one of them until the watchdog's limit.
    Every file DeepSpeed writes goes through its checkpoint engine (`save`, `makedirs`), except
    the recovery scripts rank 0 copies (`_copy_recovery_script`); both are wrapped on this
    engine for the duration of one save, so every rank runs the whole save and reaches the
    agreement that follows it. Either seam missing (another DeepSpeed version) is left
    alone: a failure there raises as before, and the watchdog reports the ranks left waiting."""

    def __init__(self, engine, failures: _WriteFailures):
        self.engine, self.failures = engine, failures
        self.inner = getattr(engine, "checkpoint_engine", None)
        self.copy_scripts = getattr(engine, "_copy_recovery_script", None)

    def __enter__(self):
        if self.inner is not None:
            self.engine.checkpoint_engine = self
        if self.copy_scripts is not None:
            self.engine._copy_recovery_script = lambda path: self.failures.attempt(
                f"copying DeepSpeed's recovery scripts to {path}", self.copy_scripts, path
            )
        return self

    def __exit__(self, *exc):
        if self.inner is not None:
            self.engine.checkpoint_engine = self.inner
        if self.copy_scripts is not None:
            del self.engine._copy_recovery_script  # the instance attribute: back to the method

    def save(self, state_dict, path: str):
        self.failures.attempt(f"writing {path}", self.inner.save, state_dict, path)

    def makedirs(self, path, exist_ok=False):
        self.failures.attempt(f"creating {path}", self.inner.makedirs, path, exist_ok=exist_ok)

    def __getattr__(self, name):  # create, commit, is_decoupled, ...: DeepSpeed's own
        return getattr(self.inner, name)


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def file_owner(relpath: str) -> int | None:
    """The rank that wrote (and will read) a file, None for files shared by all ranks."""
    match = _RANK_IN_NAME.search(Path(relpath).name)
    return int(match.group(1)) if match else None


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    world_size: int

    def client_state(self, rank: int) -> dict:
        return json.loads((self.path / client_file_name(rank)).read_text())

    def client_states(self) -> list[dict]:
        return [self.client_state(r) for r in range(self.world_size)]


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int, rank: int, world_size: int):
        self.root = checkpoints_dir(run_dir)
        self.keep = keep
        self.rank, self.world_size = rank, world_size

    # -- writing ------------------------------------------------------------------------------

    def save(self, engine, step: int, ema, client_state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it. Returns the published directory, or raises
        CheckpointWriteError on every rank when any rank failed to write (nothing published).

        The ranks agree after rank 0 made the temporary directory, after every rank wrote
        its files (a gather, which is also the barrier before anyone lists them), after they
        read them back and after rank 0 published. A failed write never skips a collective
        the others enter: it is remembered until the next agreement."""
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        final = self.root / step_dir_name(step)
        failed = _WriteFailures(tmp)
        if self.rank == 0:
            failed.attempt(f"creating {tmp}", self._fresh_directory, tmp)
        self._agree(step, tmp, distributed.broadcast_object({0: failed.first}))

        with _GuardedDeepSpeedWrites(engine, failed):
            engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False)
        failed.attempt("writing the EMA", ema.save, tmp)
        failed.attempt(
            "writing the trainer state",
            write_json_atomic,
            tmp / client_file_name(self.rank),
            client_state,
        )
        if self.rank == 0:
            failed.attempt(f"writing {CONFIG_FILE}", write_atomic, tmp / CONFIG_FILE, config_yaml)
        self._agree(step, tmp, dict(enumerate(distributed.gather_objects(failed.first))))

        mine = failed.attempt(
            f"reading back {tmp}",
            self._describe,
            tmp,
            lambda rel: file_owner(rel) in (self.rank, None),
            crc=True,
        )
        described = distributed.gather_objects((mine, failed.first))
        self._agree(step, tmp, {r: error for r, (_, error) in enumerate(described)})
        if self.rank == 0:
            files: dict[str, dict] = {}
            for part, _ in described:
                files.update(part)
            failed.attempt(f"publishing {final}", self._publish, tmp, final, step, files)
        self._agree(step, tmp, {0: distributed.broadcast_object(failed.first)})
        if self.rank == 0:
            self._prune(keep_also=final)
        distributed.barrier()
        return final

    def _fresh_directory(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def _agree(self, step: int, tmp: Path, failures: dict[int, str | None]) -> None:
        """`failures` is the same on every rank (it came from a collective): if any rank
        failed, remove the temporary directory (rank 0, best effort) and raise on all."""
        failures = {r: e for r, e in failures.items() if e}
        if not failures:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(step, tmp, failures)

    def _publish(self, tmp: Path, final: Path, step: int, files: dict[str, dict]) -> None:
        """Rank 0: manifest, then the two renames. Everything that needs space (the manifest,
        the new `latest`) is written before anything is renamed, so a full disk leaves the
        previous state; a rename that fails after the first is undone."""
        write_manifest(tmp, step, self.world_size, files)
        latest = self.root / LATEST
        latest_tmp = stage_file(latest, final.name + "\n")
        try:
            if final.exists():  # the same step saved again after a resume: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            try:
                os.replace(latest_tmp, latest)
            except OSError:
                os.replace(final, tmp)  # unpublish; _agree then removes it
                raise
        finally:
            latest_tmp.unlink(missing_ok=True)

    def _describe(self, directory: Path, select, crc: bool) -> dict[str, dict]:
        out = {}
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory).as_posix()
            if path.is_file() and rel != MANIFEST and select(rel):
                entry = {"size": path.stat().st_size}
                if crc:
                    entry["crc32"] = crc32_file(path)
                out[rel] = entry
        return out

    def _prune(self, keep_also: Path) -> None:
        published = self.published()
        for old in published[self.keep :]:
            if old.path != keep_also:
                shutil.rmtree(old.path, ignore_errors=True)

    def remove_stale_temporaries(self) -> None:
        """Rank 0, at start: drop the remains of checkpoints a killed run was writing."""
        if self.rank == 0 and self.root.is_dir():
            for tmp in self.root.glob(f"{TMP_PREFIX}*"):
                log.warning("removing incomplete checkpoint %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------

    def published(self) -> list[Checkpoint]:
        """Checkpoints with a manifest, newest first (validity not checked)."""
        found = []
        if not self.root.is_dir():
            return found
        for path in self.root.iterdir():
            if STEP_DIR.match(path.name) and (path / MANIFEST).is_file():
                try:
                    manifest = read_manifest(path)
                    found.append(
                        Checkpoint(path, int(manifest["step"]), int(manifest["world_size"]))
                    )
                except (ValueError, KeyError, OSError) as e:
                    log.warning("unreadable manifest in %s (%s); ignoring it", path, e)
        return sorted(found, key=lambda c: c.step, reverse=True)

    def problems(self, checkpoint: Checkpoint) -> list[str]:
        """What is wrong with a checkpoint from this rank's point of view (empty = intact)."""
        manifest = read_manifest(checkpoint.path)
        same_layout = checkpoint.world_size == self.world_size
        wrong = []
        for rel, entry in manifest["files"].items():
            path = checkpoint.path / rel
            if not path.is_file():
                wrong.append(f"{rel} is missing")
                continue
            if path.stat().st_size != entry["size"]:
                wrong.append(
                    f"{rel} has {path.stat().st_size} bytes, manifest says {entry['size']}"
                )
                continue
            owner = file_owner(rel)
            # Same layout: a rank reads its own shards. Another layout: rank 0 converts
            # all of them to a universal checkpoint, so rank 0 checks every file.
            reads_it = owner is None or (owner == self.rank if same_layout else self.rank == 0)
            if reads_it and crc32_file(path) != entry["crc32"]:
                wrong.append(f"{rel} fails its CRC-32 check")
        return wrong

    def find_resumable(self) -> Checkpoint | None:
        """Collective: the newest checkpoint all ranks agree is intact, or None."""
        candidates = distributed.broadcast_object(self.published() if self.rank == 0 else None)
        for checkpoint in candidates:
            try:
                wrong = self.problems(checkpoint)
            except (OSError, ValueError, KeyError) as e:
                wrong = [f"manifest unreadable: {e}"]
            if wrong:
                log.warning(
                    "rank %d: checkpoint %s is damaged: %s",
                    self.rank,
                    checkpoint.path,
                    "; ".join(wrong[:5]),
                )
            if distributed.all_true(not wrong):
                return checkpoint
            if self.rank == 0:
                log.warning("skipping damaged checkpoint %s for an older one", checkpoint.path)
        return None

    def ensure_universal(self, checkpoint: Checkpoint) -> str:
        """Collective: convert a checkpoint of another world size once (rank 0) with
        DeepSpeed's ds_to_universal; returns the tag to load."""
        target = checkpoint.path / UNIVERSAL_TAG
        if self.rank == 0 and not target.is_dir():
            import argparse

            from deepspeed.checkpoint import ds_to_universal

            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: converting it to a "
                "DeepSpeed universal checkpoint",
                checkpoint.path,
                checkpoint.world_size,
                self.world_size,
            )
            # atomic_path: ds_to_universal creates the folder it is given; a killed
            # conversion's leftover (same temporary name) is reclaimed by the next one.
            with atomic_path(target) as tmp:
                args = argparse.Namespace(
                    input_folder=str(checkpoint.path / DS_TAG),
                    output_folder=str(tmp),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=False,
                )
                ds_to_universal.main(args)
        distributed.barrier()
        return UNIVERSAL_TAG
