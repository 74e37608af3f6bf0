"""Hang detection: a watchdog thread on every rank, heartbeats in the run directory.

A rank that stops (SIGSTOP, a wedged GPU, an NFS read that never returns, a dead NIC) leaves
the others waiting in a collective until the process-group timeout, holding the allocation.
Here every rank runs a daemon thread that knows which section the training loop is in
(`setup`, `step`, `checkpoint`, `eval`: the loop calls `enter`, two attribute writes) and
how long it may take. The thread also writes a heartbeat for its rank every `heartbeat_s`
(RUN/heartbeats/rank_NNNNN.json: host, pid, section, step and a sequence number), through
the shared file system rather than the process group, which is exactly what is blocked.

When a rank has been in its section longer than the section's limit, its thread:
1. finds the stuck ranks: those whose heartbeat does not advance over two more heartbeat
   periods (a stopped or dead process; a wedged one whose thread still beats is reported as
   waiting like the others, with its section and step);
2. logs one line naming them (host, section, step, silence) and its own wait;
3. on the lowest live rank, appends the fault to RUN/faults.jsonl (the history, kept across
   resumes) and a final record to metrics.jsonl (dropped with the steps a resume redoes);
4. on that rank, runs `on_fault` (under Slurm: requeue the job, slurm.requeue);
5. ends stuck ranks on its own host with SIGKILL (a stopped process ignores SIGTERM), and
   exits with EXIT_HUNG, so the launcher (torchrun, srun --kill-on-bad-exit) ends the rest
   and the job can be restarted from its last complete checkpoint.

All ranks block in the same collective at nearly the same time, so they all reach their limit
within a poll of each other and all report. The step limit is fixed (`step_timeout_s`) or,
with `step_timeout_factor` > 0, k times the slowest of the recent steps with
`step_timeout_s` as the floor; until a first step has completed (compilation, data workers
warming up), the set-up limit applies to it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mmdit.atomic_file import write_atomic
from training.metrics_log import METRICS_FILE, append_whole_line

log = logging.getLogger(__name__)

EXIT_HUNG = 4  # a rank stopped making progress; restart the job from its last checkpoint
HEARTBEAT_DIR = "heartbeats"
FAULTS_FILE = "faults.jsonl"
SECTIONS = ("setup", "step", "checkpoint", "eval")
RECENT_STEPS = 50  # steps whose durations the adaptive step limit looks at
JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


@dataclass(frozen=True)
class Limits:
    """Seconds a rank may spend in one section before the job is declared hung (0 = never)."""

    setup: float
    step: float
    checkpoint: float
    eval: float
    step_factor: float = 0.0  # > 0: the step limit is max(step, factor x slowest recent step)


@dataclass(frozen=True)
class Beat:
    rank: int
    host: str
    pid: int
    section: str
    step: int
    seq: int
    in_section_s: float
    incarnation: str = ""  # which start of the job wrote it (see Watchdog)

    @classmethod
    def read(cls, path: Path) -> Beat | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # not written yet, or replaced while we read


@dataclass(frozen=True)
class HangReport:
    rank: int  # the reporting rank
    host: str
    section: str
    step: int
    waited_s: float
    limit_s: float
    stuck: tuple[Beat | int, ...]  # a rank's last heartbeat, or its number if it never beat
    error: str = ""  # set when a collective failed (a peer died) rather than timed out

    def line(self) -> str:
        def who(s: Beat | int) -> str:
            if isinstance(s, int):
                return f"rank {s} (never sent a heartbeat)"
            return (
                f"rank {s.rank} on {s.host} (pid {s.pid}) in {s.section} at step {s.step}, "
                f"silent since it had been there {s.in_section_s:.0f} s"
            )

        stuck = "; ".join(who(s) for s in self.stuck) or (
            "no rank stopped beating: all wait in a collective that never completes "
            "(a network or device fault)"
        )
        if self.error:
            what = (
                f"peer lost: a collective failed on rank {self.rank} on {self.host} in "
                f"{self.section} at step {self.step} ({self.error}). Silent"
            )
        else:
            what = (
                f"hang: rank {self.rank} on {self.host} has been in {self.section} at step "
                f"{self.step} for {self.waited_s:.1f} s (limit {self.limit_s:g} s). Stuck"
            )
        return (
            f"{what}: {stuck}. Exiting with status {EXIT_HUNG}; rerun to resume from the last "
            "checkpoint"
        )

    def stuck_hosts(self) -> list[str]:
        """Hosts of the stuck ranks that sent a heartbeat, sorted, without repeats."""
        return sorted({s.host for s in self.stuck if isinstance(s, Beat)})

    def record(self) -> dict:
        return {
            "step": self.step,
            "time": time.time(),
            "event": "peer_lost" if self.error else "hang",
            "section": self.section,
            "waited_s": round(self.waited_s, 1),
            "limit_s": self.limit_s,
            "reported_by": self.rank,
            "error": self.error,
            "job": job_identity(),
            "stuck": [
                {"rank": s} if isinstance(s, int) else {"rank": s.rank, "host": s.host}
                for s in self.stuck
            ],
        }


class Watchdog:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        rank: int,
        world: int,
        limits: Limits,
        *,
        heartbeat_s: float = 5.0,
        incarnation: str = "",
        on_fault: Callable[[HangReport], None] | None = None,
        exit_process: Callable[[int], None] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`incarnation`: a token the ranks of this start of the job share (the trainer
        broadcasts one from rank 0). Heartbeats left by an earlier start (a resume, a restart)
        count as none: their pids may now belong to other processes, never to be killed.

        `on_fault(report)` runs on the reporting rank (the lowest live one) after the
        records are written and before the exit: what the launcher should do next (on Slurm,
        requeue the job; slurm.requeue)."""
        self.run_dir = Path(run_dir)
        self.rank, self.world = rank, world
        self.limits = limits
        self.heartbeat_s = heartbeat_s
        self.incarnation = incarnation
        self._on_fault = on_fault
        self._exit = exit_process
        self._clock = clock
        # Slurm's name for the node when there is one: what `launch.exclude_bad_nodes` gives
        # back to Slurm (it may differ from the host name, e.g. a short name vs an FQDN).
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self._section, self._since, self._step = "setup", clock(), 0
        self._steps: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmdit-watchdog", daemon=True)
        self.beats = self.run_dir / HEARTBEAT_DIR
        self.beats.mkdir(parents=True, exist_ok=True)

    # -- called by the training loop (cheap: no I/O, no lock) -------------------------------

    def enter(self, section: str, step: int | None = None) -> None:
        if section not in SECTIONS:
            raise ValueError(f"unknown watchdog section {section!r}; one of {SECTIONS}")
        now = self._clock()
        if self._section == "step":
            self._steps.append(now - self._since)
        if step is not None:
            self._step = step
        self._section, self._since = section, now

    def start(self) -> Watchdog:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.heartbeat_s)

    # -- the thread --------------------------------------------------------------------------

    def limit(self, section: str) -> float:
        if section == "step":
            if not self._steps:  # the first step compiles and warms up: set-up's limit
                return self.limits.setup
            if self.limits.step_factor > 0:
                return max(self.limits.step, self.limits.step_factor * max(self._steps))
        return getattr(self.limits, section)

    def _run(self) -> None:
        poll = min(1.0, self.heartbeat_s)
        last_beat = self._clock()
        while not self._stop.wait(poll):
            now = self._clock()
            if now - last_beat >= self.heartbeat_s:
                self._beat()
                last_beat = now
            section, since = self._section, self._since
            limit = self.limit(section)
            if limit and now - since > limit:
                self._hang(section, now - since, limit)
                return

    def _beat(self) -> None:
        self._seq += 1
        beat = Beat(
            rank=self.rank,
            host=self.host,
            pid=os.getpid(),
            section=self._section,
            step=self._step,
            seq=self._seq,
            in_section_s=round(self._clock() - self._since, 1),
            incarnation=self.incarnation,
        )
        path = self.beats / f"rank_{self.rank:05d}.json"
        try:  # not fsynced: a beat is rewritten every few seconds, one lost to a crash is moot
            write_atomic(path, json.dumps(beat.__dict__), fsync=False)
        except OSError as e:  # a full or flaky disk must not kill the watchdog
            log.warning("rank %d: heartbeat not written: %s", self.rank, e)

    def read_beats(self) -> dict[int, Beat]:
        beats = {}
        for rank in range(self.world):
            beat = Beat.read(self.beats / f"rank_{rank:05d}.json")
            if beat is not None and beat.incarnation == self.incarnation:
                beats[rank] = beat
        return beats

    def stuck_ranks(self) -> tuple[Beat | int, ...]:
        """Ranks whose heartbeat does not advance over two heartbeat periods."""
        before = self.read_beats()
        deadline = self._clock() + 2 * self.heartbeat_s + 0.5
        silent = set(range(self.world)) - {self.rank}
        while silent and self._clock() < deadline:
            time.sleep(min(0.5, self.heartbeat_s / 2))
            self._beat()  # ours keeps advancing while we look at the others
            now = self.read_beats()
            silent = {
                r for r in silent if r not in now or (r in before and now[r].seq == before[r].seq)
            }
        return tuple(before.get(r, r) for r in sorted(silent))

    def peer_failure(self, error: BaseException) -> None:
        """Called by the training loop when a collective raised: if a peer stopped beating
        (it died or stopped), report it and exit with EXIT_HUNG like a hang; otherwise
        return, and the error is the program's own."""
        if self.world == 1:
            return
        if threading.current_thread() is threading.main_thread():
            # The launcher may be tearing the job down (torchrun SIGTERMs every process when
            # one dies): a data worker ended that way must not raise (torch's DataLoader SIGCHLD
            # handler) in the middle of the report.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        stuck = self.stuck_ranks()
        if not stuck:
            return
        section, since = self._section, self._since
        message = " ".join(str(error).split())[:300] or type(error).__name__
        report = HangReport(
            self.rank, self.host, section, self._step, self._clock() - since, 0.0, stuck, message
        )
        self._stop.set()
        self._finish(report)

    def _hang(self, section: str, waited: float, limit: float) -> None:
        report = None
        try:
            report = HangReport(
                self.rank, self.host, section, self._step, waited, limit, self.stuck_ranks()
            )
        finally:
            self._finish(report)

    def _finish(self, report: HangReport | None) -> None:
        """Report (when there is a report), then exit with EXIT_HUNG whatever happens."""
        try:
            if report is None:
                return
            line = report.line()
            log.error("rank %d: %s", self.rank, line)
            print(f"[rank {self.rank}] {line}", file=sys.stderr, flush=True)
            if self.rank == lowest_live_rank(report, self.world):
                append_fault_record(self.run_dir, report.record())
                if self._on_fault is not None:
                    try:
                        self._on_fault(report)
                    except Exception as e:  # e.g. past the requeue limit: say so, still exit
                        print(f"[rank {self.rank}] {e}", file=sys.stderr, flush=True)
            self._end_stuck_on_this_host(report.stuck)
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            self._exit(EXIT_HUNG)

    def _end_stuck_on_this_host(self, stuck) -> None:
        for beat in stuck:
            if isinstance(beat, Beat) and beat.host == self.host and beat.pid != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(beat.pid, signal.SIGKILL)


def lowest_live_rank(report: HangReport, world: int) -> int:
    """The rank that writes the shared records of a hang: the lowest one not stuck."""
    stuck = {s if isinstance(s, int) else s.rank for s in report.stuck}
    return min(r for r in range(world) if r not in stuck)


def job_identity() -> dict[str, str]:
    """Which incarnation of the job wrote a record (a requeue or torchrun restart is another)."""
    return {k: os.environ[k] for k in JOB_VARIABLES if k in os.environ}


def append_fault_record(run_dir: Path, record: Mapping) -> None:
    """A fault's record: appended to RUN/faults.jsonl (the history, kept across resumes) and,
    as the run's latest record, to metrics.jsonl. Never raises: the disk may be the fault."""
    _append_line(run_dir / FAULTS_FILE, record)
    _append_line(run_dir / METRICS_FILE, record)


def _append_line(path: Path, record: Mapping) -> None:
    try:
        with open(path, "ab", buffering=0) as f:
            append_whole_line(f, json.dumps(record) + "\n")
    except OSError as e:
        log.warning("could not append to %s: %s", path, e)
