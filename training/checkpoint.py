"""Checkpoints that are published atomically, validated by every rank, and found by themselves.

Layout of a run directory:

    RUN/checkpoints/step_00001000/
        ds/                      DeepSpeed ZeRO-3 shards (model, optimizer), one set per rank
        universal/               made once when a run resumes on another world size
        ema_rank_*_of_*.safetensors
        client_rank_00000.json   per-rank trainer state: step, data position, RNG, counters
        config.yaml              the resolved run config (data, never a pickled object)
        manifest.json            written last: every file's size and CRC-32, the world size
    RUN/checkpoints/latest       name of the newest published checkpoint
    RUN/checkpoints/.tmp_step_*  a checkpoint being written (ignored, removed on start)

Publication: every rank writes into the `.tmp_` directory; their file checksums are gathered
to rank 0, which writes the manifest, renames the directory into place and replaces `latest`
(both `os.replace`, atomic on POSIX). A crash at any point leaves either the previous
checkpoint or the new one, never half of one.

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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The layout's names are shared with its readers (eval, mmdit-export).
from eval.checkpoints import DS_TAG, LATEST, MANIFEST, STEP_DIR, step_dir_name
from mmdit import distributed
from mmdit.atomic_file import write_atomic

log = logging.getLogger(__name__)

UNIVERSAL_TAG = "universal"
TMP_PREFIX = ".tmp_"
_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|_rank_)(\d+)")


def client_file_name(rank: int) -> str:
    return f"client_rank_{rank:05d}.json"


def file_owner(relpath: str) -> int | None:
    """The rank that wrote (and will read) a file, None for files shared by all ranks."""
    match = _RANK_IN_NAME.search(Path(relpath).name)
    return int(match.group(1)) if match else None


def crc32_file(path: Path, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


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
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank, self.world_size = rank, world_size

    # -- writing ------------------------------------------------------------------------------

    def save(self, engine, step: int, ema, client_state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it. Returns the published directory."""
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False)
        ema.save(tmp)
        write_json_atomic(tmp / client_file_name(self.rank), client_state)
        if self.rank == 0:
            write_atomic(tmp / "config.yaml", config_yaml)
        distributed.barrier()  # every rank's files are on disk before anyone lists them
        mine = self._describe(tmp, lambda rel: file_owner(rel) in (self.rank, None), crc=True)
        described = distributed.gather_objects(mine)
        final = self.root / step_dir_name(step)
        if self.rank == 0:
            files: dict[str, dict] = {}
            for part in described:
                files.update(part)
            self._write_manifest(tmp, step, files)
            if final.exists():  # the same step saved again after a resume: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(keep_also=final)
        distributed.barrier()
        return final

    def _write_manifest(self, directory: Path, step: int, files: dict[str, dict]) -> None:
        write_json_atomic(
            directory / MANIFEST,
            {"format": 1, "step": step, "world_size": self.world_size, "files": files},
        )

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
                    manifest = json.loads((path / MANIFEST).read_text())
                    found.append(
                        Checkpoint(path, int(manifest["step"]), int(manifest["world_size"]))
                    )
                except (ValueError, KeyError, OSError) as e:
                    log.warning("unreadable manifest in %s (%s); ignoring it", path, e)
        return sorted(found, key=lambda c: c.step, reverse=True)

    def problems(self, checkpoint: Checkpoint) -> list[str]:
        """What is wrong with a checkpoint from this rank's point of view (empty = intact)."""
        manifest = json.loads((checkpoint.path / MANIFEST).read_text())
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

            tmp = checkpoint.path / f"{TMP_PREFIX}{UNIVERSAL_TAG}"
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: converting it to a "
                "DeepSpeed universal checkpoint",
                checkpoint.path,
                checkpoint.world_size,
                self.world_size,
            )
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
            os.replace(tmp, target)
        distributed.barrier()
        return UNIVERSAL_TAG
