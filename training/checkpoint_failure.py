"""Reporting a checkpoint that could not be written: one log line that says what failed on
which rank, what was kept and what the run does next, and a record in RUN/faults.jsonl."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from training.checkpoint import CheckpointWriteError
from training.watchdog import append_fault_record, job_identity

log = logging.getLogger("mmdit.train")


def report_checkpoint_failure(
    error: CheckpointWriteError,
    *,
    run_dir: Path,
    step: int,
    max_steps: int,
    checkpoint_every: int,
    on_error: str,
    previous: str | None,
    seconds: float,
    signalled: bool,
    exit_status: int,
) -> None:
    """Rank 0 only. `previous`: the newest published checkpoint's directory name, if any;
    `exit_status`: the status the run stops with when it stops (faults.on_checkpoint_error=
    stop, the final checkpoint, or one a signal asked for)."""
    final = step >= max_steps
    kept = (
        f"{previous} and `latest` are unchanged"
        if previous
        else "there is no earlier checkpoint (a rerun starts over)"
    )
    if on_error == "stop" or final or signalled:
        why = (
            "faults.on_checkpoint_error=stop"
            if on_error == "stop"
            else ("it was the final checkpoint" if final else "a signal asked for it")
        )
        action = "stop"
        then = (
            f"stopping with status {exit_status} ({why}): free space or fix the file "
            "system, then rerun the same command to resume from the last checkpoint"
        )
    else:
        retry_at = min((step // checkpoint_every + 1) * checkpoint_every, max_steps)
        action = "continue"
        then = (
            f"training continues (faults.on_checkpoint_error=continue); the next try is at "
            f"step {retry_at}"
        )
    log.error(
        "checkpoint of step %d not written to %s after %.1f s: %s. Nothing was published: %s; %s",
        step,
        error.path,
        seconds,
        error.errors(),
        kept,
        then,
    )
    record = {
        "step": step,
        "time": time.time(),
        "event": "checkpoint_failed",
        "section": "checkpoint",
        "path": str(error.path),
        "errors": {str(rank): message for rank, message in error.failures.items()},
        "kept": previous,
        "action": action,
        "job": job_identity(),
    }
    append_fault_record(run_dir, record)
