"""What a job does when the trainer stops before its end: requeue itself, up to
`launch.max_requeues` times, and say why in the log.

- status 3: the trainer checkpointed on Slurm's warning signal (time limit, preemption);
- status 4: a rank hung or was lost (training.watchdog; RUN/faults.jsonl says which);
- killed by a signal (status > 128 from srun, e.g. a rank killed by the OOM killer): a rank
  died.

Each time the next allocation resumes from the last complete checkpoint. Any other status is
the program's own error and is passed on (requeueing a bug would only repeat it). With
`launch.exclude_bad_nodes` the hosts of the ranks that hung are added to the job's excluded
nodes, so the requeued job avoids them.

Shared by the submitit tasks (slurm.tasks: the trainer's fault hook, in the reporting rank)
and the sbatch templates (`python -m slurm.requeue` after srun), so both paths behave the
same. One process asks Slurm to requeue; Slurm then ends every task of this allocation and
starts the job again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

EXIT_PREEMPTED = 3  # training.trainer.EXIT_PREEMPTED (kept in sync by a test)
EXIT_HUNG = 4  # training.watchdog.EXIT_HUNG (kept in sync by a test)
EXIT_STORAGE = 5  # training.trainer.EXIT_STORAGE (kept in sync by a test)
HANG_EVENTS = ("hang", "peer_lost")  # faults.jsonl also records failed checkpoint writes
FAULTS_FILE = "faults.jsonl"  # training.watchdog.FAULTS_FILE (kept in sync by a test)


def job_id() -> str:
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    jid = os.environ.get("SLURM_JOB_ID")
    if not jid:
        raise RuntimeError("SLURM_JOB_ID is not set: not running inside a Slurm job")
    return jid


def requeue(reason: str, max_requeues: int, *, exclude_nodes: list[str] | tuple = ()) -> None:
    """Ask Slurm to requeue this job, logging why; past the limit raise instead, so the job
    ends FAILED with the reason in its log."""
    restarts = check_requeue_limit(reason, max_requeues)
    jid = job_id()
    print(
        f"job {jid}: {reason}; requeueing (requeue {restarts + 1} of at most {max_requeues})",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run(["scontrol", "requeue", jid], check=True, timeout=60)
    if exclude_nodes:
        exclude(jid, exclude_nodes)


def check_requeue_limit(reason: str, max_requeues: int) -> int:
    """The requeues so far; past the limit raise, so the job ends FAILED with the reason."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        raise RuntimeError(
            f"job {job_id()}: {reason}, but it has been requeued {restarts} times "
            f"(launch.max_requeues={max_requeues}); not requeueing. The run resumes from its "
            "last checkpoint when submitted again"
        )
    return restarts


def exclude(jid: str, nodes: list[str] | tuple) -> None:
    """Add `nodes` to the (requeued, pending) job's excluded nodes."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=60
    ).stdout
    current = next(
        (f.split("=", 1)[1] for f in shown.split() if f.startswith("ExcNodeList=")), "(null)"
    )
    hosts = set(nodes)
    if current != "(null)":
        expanded = subprocess.run(
            ["scontrol", "show", "hostnames", current], capture_output=True, text=True, timeout=60
        ).stdout.split()
        hosts.update(expanded)
    value = ",".join(sorted(hosts))
    print(f"job {jid}: excluding nodes {value} from the next allocation", file=sys.stderr)
    subprocess.run(
        ["scontrol", "update", f"JobId={jid}", f"ExcNodeList={value}"], check=True, timeout=60
    )


def requeue_or_stop(max_requeues: int, *, is_main: bool, wait_s: float = 300.0) -> None:
    """After the trainer checkpointed on Slurm's signal (status 3): requeue this job (main
    rank) and wait for Slurm to end the tasks; never returns. Past the requeue limit, raise."""
    reason = "checkpoint written after a Slurm signal"
    if is_main:
        requeue(reason, max_requeues)
    else:
        check_requeue_limit(reason, max_requeues)
    time.sleep(wait_s)  # Slurm ends this task as part of the requeue
    os._exit(EXIT_PREEMPTED)


def last_fault(run_dir: str | os.PathLike) -> dict | None:
    """This job's newest hang or lost-peer record in RUN/faults.jsonl (None when it wrote
    none)."""
    path = Path(run_dir) / FAULTS_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    jid = os.environ.get("SLURM_JOB_ID")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        job = record.get("job", {})
        if record.get("event") not in HANG_EVENTS:
            continue
        if job.get("SLURM_JOB_ID") == jid and job.get("SLURM_RESTART_COUNT", "0") == restarts:
            return record
    return None


def fault_reason(record: dict | None) -> str:
    if record is None:
        return "a rank hung or was lost (no record in RUN/faults.jsonl)"
    stuck = ", ".join(
        f"rank {s['rank']}" + (f" on {s['host']}" if "host" in s else "") for s in record["stuck"]
    )
    what = "lost a peer" if record["event"] == "peer_lost" else "hung"
    return f"training {what} in {record['section']} at step {record['step']}" + (
        f" ({stuck})" if stuck else ""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slurm.requeue",
        description="In a batch script after `srun mmdit-train`: requeue the job when the "
        "trainer checkpointed on Slurm's signal (status 3), a rank hung or was lost (status "
        "4) or a rank was killed (status > 128); else pass the status on.",
    )
    parser.add_argument("--exit-code", type=int, required=True, help="srun's exit status")
    parser.add_argument("--max-requeues", type=int, required=True, help="launch.max_requeues")
    parser.add_argument("--run-dir", help="train.run_dir, where RUN/faults.jsonl is read")
    parser.add_argument(
        "--exclude-bad-nodes",
        action="store_true",
        help="launch.exclude_bad_nodes: keep the next allocation off the hosts that hung",
    )
    args = parser.parse_args(argv)
    code = args.exit_code
    exclude_nodes: list[str] = []
    if code == EXIT_PREEMPTED:
        reason = "checkpoint written after a Slurm signal"
    elif code == EXIT_HUNG:
        record = last_fault(args.run_dir) if args.run_dir else None
        reason = fault_reason(record)
        if args.exclude_bad_nodes and record is not None:
            exclude_nodes = sorted({s["host"] for s in record["stuck"] if "host" in s})
    elif code > 128:
        reason = f"a rank was killed (srun exit status {code})"
    elif code == EXIT_STORAGE:
        # The same storage would fail the same way: a person frees space or fixes it first.
        print(
            f"job {job_id()}: a checkpoint could not be written (RUN/faults.jsonl, the log); "
            "not requeueing: fix the storage and submit again to resume from the last "
            "checkpoint",
            file=sys.stderr,
        )
        return code
    else:
        if code == 0:
            print(f"job {job_id()}: training finished", file=sys.stderr)
        return code
    try:
        requeue(reason, args.max_requeues, exclude_nodes=exclude_nodes)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
