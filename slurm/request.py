"""A Slurm resource request: built from the run file's `launch` section and command-line flags,
checked against the cluster before anything is submitted, rendered as sbatch lines.

One task per GPU (or per CPU rank with `launch.gpus: false`), so `srun` starts every rank and
the trainer reads its rank from SLURM_PROCID. The job asks for USR2 `signal_lead_s` seconds
before its time limit (the trainer checkpoints on all ranks, then the job requeues itself) and
is requeueable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, replace

from training.config import LaunchConfig

_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$|^(\d+)$")


class SubmitError(ValueError):
    """A request that cannot run; the message names the input and the fix."""


def time_to_minutes(value: str) -> int:
    """Slurm's [D-]HH:MM:SS (or plain minutes) -> minutes, rounded up."""
    match = _TIME.match(value.strip())
    if not match:
        raise SubmitError(
            f"time {value!r} (--time / launch.time) is not [D-]HH:MM:SS or minutes, e.g. 72:00:00"
        )
    days, hours, minutes, seconds, plain = match.groups()
    if plain is not None:
        return int(plain)
    total = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds)
    return -(-total // 60)


@dataclass(frozen=True)
class Request:
    launch: LaunchConfig
    job_name: str

    @property
    def tasks_per_node(self) -> int:
        return self.launch.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.launch.nodes * self.launch.gpus_per_node

    @property
    def minutes(self) -> int:
        return time_to_minutes(self.launch.time)

    def sbatch_options(self) -> list[tuple[str, str | None]]:
        """(option, value) pairs; value None is a bare flag."""
        la = self.launch
        opts: list[tuple[str, str | None]] = [
            ("job-name", self.job_name),
            ("nodes", str(la.nodes)),
            ("ntasks-per-node", str(self.tasks_per_node)),
            ("cpus-per-task", str(la.cpus_per_task)),
            ("time", la.time),
            ("signal", f"USR2@{la.signal_lead_s}"),
            ("requeue", None),
        ]
        if la.gpus:
            opts.append(("gpus-per-node", str(la.gpus_per_node)))
        for name, value in (
            ("partition", la.partition),
            ("account", la.account),
            ("qos", la.qos),
            ("constraint", la.constraint),
            ("mem", la.mem),
        ):
            if value:
                opts.append((name, value))
        if la.exclusive:
            opts.append(("exclusive", None))
        return opts

    def sbatch_lines(self) -> list[str]:
        return [
            f"#SBATCH --{k}" + (f"={v}" if v is not None else "") for k, v in self.sbatch_options()
        ]


def with_flags(launch: LaunchConfig, **flags) -> LaunchConfig:
    """The launch section with the command line's non-None flags applied."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return replace(launch, **given)
    except ValueError as e:
        raise SubmitError(str(e)) from None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("sinfo") is not None


def validate(request: Request, script: str) -> str:
    """Ask the cluster whether the request can ever run, without submitting it.

    Partition names are checked with `sinfo` (a clear message listing the partitions), then
    `sbatch --test-only` judges the whole request (resources, limits, account, QOS) and says
    when it would start. Returns Slurm's verdict; raises SubmitError naming the problem."""
    if not slurm_available():
        raise SubmitError(
            "sbatch/sinfo not found: run mmdit-submit on a Slurm login node (or use "
            "--emit-sbatch to write a script to submit elsewhere)"
        )
    la = request.launch
    parts = _run(["sinfo", "-h", "-o", "%P"])
    if parts.returncode != 0:
        raise SubmitError(f"sinfo failed: {parts.stderr.strip()}")
    known = sorted({p.strip().rstrip("*") for p in parts.stdout.split()})
    if la.partition and la.partition not in known:
        raise SubmitError(
            f"unknown partition {la.partition!r} (--partition / launch.partition); "
            f"this cluster has: {', '.join(known) or 'none'}"
        )
    test = subprocess.run(
        ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60
    )
    verdict = (test.stdout + test.stderr).strip()
    if test.returncode != 0:
        raise SubmitError(
            f"Slurm refuses this request ({request.launch.nodes} node(s) x "
            f"{request.tasks_per_node} task(s), {la.cpus_per_task} CPU(s) per task"
            f"{f', {la.gpus_per_node} GPU(s) per node' if la.gpus else ''}, time {la.time}): "
            f"{verdict}"
        )
    return verdict
