"""A full disk in a real 2-rank DeepSpeed job under torchrun: the run directory is a small
tmpfs with a filler file, sized so the step-2 checkpoint fits and the step-4 one does not.
The failed save is reported in one line and a faults.jsonl record, nothing of it is
published, `latest` and the step-2 checkpoint stay intact; with faults.on_checkpoint_error
=continue the run trains to max_steps (and ends with status 5, its final checkpoint being
unwritten), with =stop it ends at step 4 with status 5. After the filler is deleted the same
command resumes from step 2 and its per-step losses equal the uninterrupted run's exactly
(bf16 on the CPU is deterministic): no sample was replayed or skipped."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mmdit.checkpoints import LATEST, TMP_PREFIX
from tests.training.conftest import (
    REFERENCE_STEPS,
    losses,
    reference_args,
    run_training,
    small_tmpfs,
)
from training.checkpoint import CheckpointManager
from training.trainer import EXIT_STORAGE
from training.watchdog import FAULTS_FILE

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

MiB = 1 << 20


def _allocated(directory: Path) -> int:
    """Bytes the files under `directory` occupy (tmpfs counts whole pages)."""
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def checkpoint_bytes(reference_run) -> int:
    """What one checkpoint of the reference job occupies."""
    size = _allocated(reference_run / "checkpoints" / "step_00000002")
    print(f"one checkpoint: {size / MiB:.1f} MiB")
    return size


@pytest.fixture
def full_disk(tmp_path, checkpoint_bytes):
    """A tmpfs for the run directory, with room for one checkpoint and a half (plus 2 MiB for
    metrics, TensorBoard and heartbeats), and the filler that takes the rest."""
    size = 4 * checkpoint_bytes
    with small_tmpfs(tmp_path / "mnt", size) as mnt:
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, size - int(1.5 * checkpoint_bytes) - 2 * MiB)
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        print(f"tmpfs {size / MiB:.1f} MiB, {free / MiB:.1f} MiB free after the filler")
        yield mnt / "run", filler


def _failure_lines(stderr: str, step: int) -> list[str]:
    return [x for x in stderr.splitlines() if f"checkpoint of step {step} not written to" in x]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / FAULTS_FILE).read_text().splitlines()]


def _check_nothing_published_after_step_2(run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000002"]  # no .tmp_
    assert (root / LATEST).read_text() == "step_00000002\n"
    # Intact: every file's size, and its CRC-32 as seen by the rank that reads it.
    for rank in (0, 1):
        manager = CheckpointManager(run_dir, keep=3, rank=rank, world_size=2)
        (only,) = manager.published()
        assert only.step == 2 and manager.problems(only) == []


def test_disk_full_while_saving_then_continue_and_resume_on_the_reference_curve(
    full_disk, digit_shards, tiny_components, reference_losses
):
    run_dir, filler = full_disk
    args = reference_args(run_dir, digit_shards, tiny_components)
    result = run_training(2, args, timeout=600)
    # The final checkpoint (step 6) failed too: the run is not reported as done.
    assert result.returncode != 0 and f"exitcode  : {EXIT_STORAGE}" in result.stderr, result.stderr[
        -3000:
    ]
    (line4,) = _failure_lines(result.stderr, 4)  # one line, from rank 0 only
    assert f"{TMP_PREFIX}step_00000004 after" in line4 and "(file system full: " in line4
    assert "step_00000002 and `latest` are unchanged" in line4
    assert "training continues (faults.on_checkpoint_error=continue)" in line4
    assert "the next try is at step 6" in line4
    (line6,) = _failure_lines(result.stderr, 6)
    assert "stopping with status 5 (it was the final checkpoint)" in line6
    print(line4)

    assert losses(run_dir) == reference_losses  # it trained on through steps 5 and 6
    records = _records(run_dir)
    assert [(r["event"], r["step"], r["action"]) for r in records] == [
        ("checkpoint_failed", 4, "continue"),
        ("checkpoint_failed", 6, "stop"),
    ]
    assert records[0]["kept"] == "step_00000002" and records[0]["errors"]
    _check_nothing_published_after_step_2(run_dir)
    # Time from the failure to the next step: the failed save itself, then step 5 as usual.
    saved_in = float(re.search(r"after ([\d.]+) s:", line4).group(1))
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step5 = next(r["time"] for r in metrics if r["step"] == 5 and "loss" in r)
    print(f"failed save {saved_in:.1f} s; step 5 logged {step5 - records[0]['time']:.2f} s later")

    filler.unlink()  # the storage is fixed; the same command again
    again = run_training(2, args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"resuming from \S*/checkpoints/step_00000002", again.stderr)
    assert losses(run_dir) == reference_losses  # steps 3..6 redone: none replayed or skipped
    root = run_dir / "checkpoints"
    assert (root / LATEST).read_text() == f"step_{REFERENCE_STEPS:08d}\n"


def test_disk_full_while_saving_with_stop_ends_with_the_storage_status(
    full_disk, digit_shards, tiny_components, reference_losses
):
    run_dir, _ = full_disk
    args = reference_args(
        run_dir, digit_shards, tiny_components, **{"faults.on_checkpoint_error": "stop"}
    )
    result = run_training(2, args, timeout=600)
    assert result.returncode != 0 and f"exitcode  : {EXIT_STORAGE}" in result.stderr, result.stderr[
        -3000:
    ]
    (line,) = _failure_lines(result.stderr, 4)
    assert "stopping with status 5 (faults.on_checkpoint_error=stop)" in line
    assert "rerun the same command to resume from the last checkpoint" in line
    assert losses(run_dir) == {s: reference_losses[s] for s in range(1, 5)}  # ended at step 4
    assert [(r["step"], r["action"]) for r in _records(run_dir)] == [(4, "stop")]
    _check_nothing_published_after_step_2(run_dir)
