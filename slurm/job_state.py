"""The state of a Slurm job, and waiting until it is final.

Slurm's three views of a job disagree for a while after it ends: `squeue` drops it at once,
the controller (`scontrol show job`) says COMPLETED at once and remembers the job for
`MinJobAge` seconds, and the accounting database (`sacct`, fed by slurmdbd) follows seconds
later -- until then it still says RUNNING, or nothing at all for a job just submitted. A wait
that stops when `squeue` forgets the job and then reads `sacct` can read RUNNING for a job
that has finished. So every wait here asks the controller first (authoritative while it knows
the job) and reads `sacct` only once the controller has forgotten the job, and it stops only on
a final state. REQUEUED and PENDING are not final: a requeued job runs again.

    state = wait_for_final_state("1234", timeout_s=600)   # "COMPLETED", "FAILED", ...
    current_state("1234")                                  # Observation("RUNNING", "scontrol")
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "FINAL_STATES",
    "JobStateError",
    "JobStateTimeout",
    "Observation",
    "current_state",
    "is_final",
    "wait_for_final_state",
]

# States a job does not leave. PREEMPTED and NODE_FAIL are final in the controller's view only
# when the job is not requeued (then the controller shows it PENDING again).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
    }
)

_QUERY_TIMEOUT_S = 30.0


class JobStateError(RuntimeError):
    """The job's state cannot be read at all (no Slurm client programs on PATH)."""


class JobStateTimeout(TimeoutError):
    """The job did not reach a final state in time; the message names the states seen."""

    def __init__(self, job_id: str, elapsed_s: float, seen: list[tuple[Observation, float]]):
        self.job_id, self.elapsed_s, self.seen = job_id, elapsed_s, seen
        history = ", ".join(f"{obs} at {t:.0f} s" for obs, t in seen) or "none"
        super().__init__(
            f"job {job_id}: no final state after {elapsed_s:.0f} s; states seen: {history}. "
            f"It may still be queued or running: `scancel {job_id}` stops it, or wait longer"
        )


@dataclass(frozen=True)
class Observation:
    state: str  # e.g. "RUNNING"; "" when the source does not know the job
    source: str  # "scontrol" (the controller) or "sacct" (the accounting database)

    def __str__(self) -> str:
        return f"{self.state or 'unknown'} ({self.source})"


def is_final(state: str) -> bool:
    return state in FINAL_STATES


def normalize(raw: str) -> str:
    """`CANCELLED by 0` -> `CANCELLED`; `CANCELLED+` (sacct's truncation mark) -> `CANCELLED`."""
    words = raw.split()
    return words[0].rstrip("+").upper() if words else ""


def parse_scontrol(text: str) -> str:
    """The JobState of `scontrol show job -o ID` output ("" if there is none). An array job
    has one line per task: any task not yet final makes the whole not final."""
    states = [
        normalize(field.split("=", 1)[1])
        for line in text.splitlines()
        for field in line.split()
        if field.startswith("JobState=")
    ]
    return next((s for s in states if not is_final(s)), states[0] if states else "")


def parse_sacct(text: str) -> str:
    """The state of `sacct -n -X -P -j ID -o State` output ("" if the record is not there yet).
    Without --duplicates sacct prints the latest run of a requeued job last."""
    lines = [line for line in text.splitlines() if line.strip()]
    return normalize(lines[-1]) if lines else ""


def _query(argv: list[str]) -> str:
    """stdout of a Slurm client command; "" when it fails (job unknown, daemon busy)."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=_QUERY_TIMEOUT_S)
    except FileNotFoundError:
        raise JobStateError(
            f"`{argv[0]}` is not on PATH: the Slurm client commands are needed to follow a job "
            "(install slurm-client, or add its bin directory to PATH)"
        ) from None
    except subprocess.TimeoutExpired:
        return ""
    return res.stdout if res.returncode == 0 else ""


def current_state(job_id: str, *, accounting_only: bool = False) -> Observation:
    """The job's state from the controller while it knows the job, else from `sacct`.

    `accounting_only`: ask `sacct` alone -- what submitit and later accounting queries see."""
    if not accounting_only:
        state = parse_scontrol(_query(["scontrol", "show", "job", "-o", job_id]))
        if state:
            return Observation(state, "scontrol")
    return Observation(
        parse_sacct(_query(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])), "sacct"
    )


def wait_for_final_state(
    job_id: str,
    timeout_s: float,
    poll_s: float = 1.0,
    *,
    max_poll_s: float = 60.0,
    accounting_only: bool = False,
    on_change: Callable[[Observation, float], None] | None = None,
) -> str:
    """Poll until the job is in a final state and return it (e.g. "COMPLETED").

    Polls every `poll_s` at first and then every twentieth of the time waited so far (at most
    `max_poll_s`), so a long job is not polled needlessly often. `on_change(observation,
    seconds)` is called once per distinct state seen. Raises JobStateTimeout after `timeout_s`
    (math.inf: no limit) with the states seen."""
    start = time.monotonic()
    deadline = start + timeout_s
    seen: list[tuple[Observation, float]] = []
    while True:
        obs = current_state(job_id, accounting_only=accounting_only)
        now = time.monotonic()
        if not seen or seen[-1][0] != obs:
            seen.append((obs, now - start))
            if on_change is not None:
                on_change(obs, now - start)
        if is_final(obs.state):
            return obs.state
        if now >= deadline:
            raise JobStateTimeout(job_id, now - start, seen)
        interval = min(max_poll_s, max(poll_s, (now - start) / 20))
        time.sleep(min(interval, deadline - now))
