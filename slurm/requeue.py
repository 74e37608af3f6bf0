"""What a job does when the trainer stops on Slurm's warning signal (exit status 3): requeue
itself, up to `launch.max_requeues` times, and say so in the log.

Shared by the submitit tasks and the sbatch templates (`python -m slurm.requeue`), so both
paths behave the same. Only rank 0 (or the batch script) asks Slurm to requeue; Slurm then
ends every task of this allocation and starts the job again, and the trainer resumes from
the checkpoint all ranks just wrote.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

EXIT_PREEMPTED = 3  # training.trainer.EXIT_PREEMPTED (kept in sync by a test)


def job_id() -> str:
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    jid = os.environ.get("SLURM_JOB_ID")
    if not jid:
        raise RuntimeError("SLURM_JOB_ID is not set: not running inside a Slurm job")
    return jid


def requeue_or_stop(max_requeues: int, *, is_main: bool, wait_s: float = 300.0) -> None:
    """Requeue this job (main rank) and wait for Slurm to end the tasks; never returns.
    Past the requeue limit, raise so the job ends FAILED with the reason in its log."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    jid = job_id()
    if restarts >= max_requeues:
        raise RuntimeError(
            f"job {jid}: checkpointed after a Slurm signal, but it has been requeued "
            f"{restarts} times (launch.max_requeues={max_requeues}); not requeueing. The run "
            "resumes from its last checkpoint when submitted again"
        )
    if is_main:
        print(
            f"job {jid}: checkpoint written after a Slurm signal; requeueing "
            f"(requeue {restarts + 1} of at most {max_requeues})",
            file=sys.stderr,
            flush=True,
        )
        subprocess.run(["scontrol", "requeue", jid], check=True, timeout=60)
    time.sleep(wait_s)  # Slurm ends this task as part of the requeue
    os._exit(EXIT_PREEMPTED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slurm.requeue",
        description="In a batch script after `srun mmdit-train`: requeue the job when the "
        "trainer exited with status 3 (checkpointed on Slurm's signal), else pass the status.",
    )
    parser.add_argument("--exit-code", type=int, required=True, help="srun's exit status")
    parser.add_argument("--max-requeues", type=int, required=True, help="launch.max_requeues")
    args = parser.parse_args(argv)
    if args.exit_code != EXIT_PREEMPTED:
        if args.exit_code == 0:
            print(f"job {job_id()}: training finished", file=sys.stderr)
        return args.exit_code
    try:
        requeue_or_stop(args.max_requeues, is_main=True, wait_s=0)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
