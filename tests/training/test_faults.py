"""Faults in a real 2-rank DeepSpeed job under torchrun: a rank stopped with SIGSTOP (what a
wedged GPU, a stuck file system or a dead NIC looks like to its peers) in a step, in a
checkpoint save and in validation, and a rank killed outright. Every time the job ends
within the section's limit plus a bounded grace with the watchdog's status, one line names
the stuck rank, the record is in RUN/faults.jsonl, and running the same command again
resumes from the last complete checkpoint and finishes. The requeue of a hung Slurm job is in
tests/slurm/test_submit_cluster.py."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mmdit.distributed import free_ports
from tests.training.conftest import (
    INSTRUMENTED,
    REFERENCE_STEPS,
    REPO,
    losses,
    read_metrics,
    reference_args,
    run_training,
)
from training.watchdog import EXIT_HUNG, FAULTS_FILE

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = REFERENCE_STEPS  # the reference job (tests/training/conftest.py), with faults
LIMIT_S = 10  # every section's limit here; the steps of this model take well under 1 s
# After the limit: two heartbeat periods to find the stuck rank, the report, torchrun's
# teardown. Bounded, and far below the process group's own timeout (3600 s).
GRACE_S = 30
DEAD_RANK_BOUND_S = 30  # from a rank's death to the end of the job
SHM, SHM_BUFFERS = Path("/dev/shm"), "deepspeed_allreduce_buffer_*"  # training.launch


def _args(run_dir, digit_shards, tiny_components, **extra) -> list[str]:
    settings = {
        "faults.step_timeout_s": LIMIT_S,
        "faults.checkpoint_timeout_s": LIMIT_S,
        "faults.eval_timeout_s": LIMIT_S,
        "faults.heartbeat_s": 1,
        **extra,
    }
    return reference_args(run_dir, digit_shards, tiny_components, **settings)


def _run_ranks_as_srun_does(args, instruments: dict, timeout: float) -> subprocess.CompletedProcess:
    """The 2 ranks as plain processes with RANK/WORLD_SIZE set, as srun starts tasks: no agent
    ends the survivor when a rank dies (torchrun does, at its next monitor tick, which can
    come before the survivor's report), so what the trainer does on its own is seen. The
    result: the survivor's (rank 0's) status and both ranks' output."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_ports(1)[0]),
        **instruments,
    }
    ranks, logs = [], [tempfile.TemporaryFile("w+") for _ in range(2)]  # noqa: SIM115
    for rank, log in enumerate(logs):
        ranks.append(
            subprocess.Popen(
                [sys.executable, str(INSTRUMENTED), *args],
                cwd=REPO,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                start_new_session=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    codes = [p.wait(timeout=timeout) for p in ranks]
    output = []
    for log in logs:
        log.seek(0)
        output.append(log.read())
        log.close()
    return subprocess.CompletedProcess(ranks[0].args, codes[0], "", "\n".join(output))


def _fault(
    run_dir,
    args,
    variable: str,
    where: str,
    *,
    rerun: bool = True,
    bound_s=None,
    torchrun: bool = True,
) -> tuple[dict, str]:
    """Run the job (under torchrun, or as srun starts tasks) with rank RANK signalled in
    SECTION at STEP (`where`) and check how it ended; with `rerun`, run it again and check
    that it resumes and finishes. The fault record and the stderr of both runs."""
    if torchrun:
        result = run_training(2, args, instruments={variable: where}, timeout=600)
    else:
        result = _run_ranks_as_srun_does(args, instruments={variable: where}, timeout=600)
    ended = time.time()
    assert result.returncode != 0, result.stderr[-3000:]
    # No rank, stopped, killed or exiting, left DeepSpeed's 69 MB shared-memory buffer in RAM
    # (this job's: the port of its rendezvous is in the name; other jobs may run meanwhile).
    port = re.search(r"process group: \w+, 2 ranks, rendezvous [^:]+:(\d+)", result.stderr)
    assert port, result.stderr[-3000:]
    left = [p.name for p in SHM.glob(SHM_BUFFERS) if f"_{port.group(1)}_" in p.name]
    assert left == [], left
    stopped = float((run_dir / "stopped_at").read_text())
    bound_s = LIMIT_S + GRACE_S if bound_s is None else bound_s
    print(f"{where}: the job ended {ended - stopped:.1f} s after the fault (bound {bound_s} s)")
    assert ended - stopped < bound_s, (ended - stopped, result.stderr[-3000:])
    if torchrun:  # its summary of the failure: the ranks that reported exited with the status
        assert f"exitcode  : {EXIT_HUNG}" in result.stderr, result.stderr[-3000:]
    else:
        assert result.returncode == EXIT_HUNG, result.stderr[-3000:]
    records = [json.loads(x) for x in (run_dir / FAULTS_FILE).read_text().splitlines()]
    assert len(records) == 1, records
    metrics_tail = (run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(metrics_tail)["event"] == records[0]["event"]  # the final metrics record

    if not rerun:
        return records[0], result.stderr
    again = run_training(2, args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(read_metrics(run_dir)) == STEPS
    return records[0], result.stderr + "\n--- rerun ---\n" + again.stderr


def _resumed_from(stderr: str) -> int:
    """The step of the checkpoint the rerun resumed from (0: it started over)."""
    rerun = stderr.split("--- rerun ---")[1]
    match = re.search(r"resuming from \S*/checkpoints/step_(\d+)", rerun)
    return int(match.group(1)) if match else 0


def test_a_rank_stopped_in_a_step_is_named_and_the_rerun_resumes(
    tmp_path, digit_shards, tiny_components, reference_losses
):
    run_dir = tmp_path / "run"
    args = _args(run_dir, digit_shards, tiny_components)
    record, stderr = _fault(run_dir, args, "MMDIT_TEST_STOP_IN", "step:4:1")
    host = socket.gethostname()
    assert record["event"] == "hang" and record["section"] == "step" and record["step"] == 4
    assert record["stuck"] == [{"rank": 1, "host": host}]
    assert record["reported_by"] == 0 and record["limit_s"] == LIMIT_S
    # One line from the live rank names the stuck one, its host, section and step.
    line = next(x for x in stderr.splitlines() if "hang: rank 0" in x)
    # The watchdog looks once per heartbeat period, so it finds the hang within one period of
    # the limit; how far past it depends on the machine's load, not on a fixed number.
    waited = float(re.search(r"has been in step at step 4 for ([\d.]+) s", line).group(1))
    assert LIMIT_S <= waited < LIMIT_S + GRACE_S, line
    # The stuck rank is named by its last heartbeat, written once per period by a thread:
    # from step 4, or from an earlier step when it was stopped (as here, on entering the step)
    # before its next beat was due; under a heavy load the thread can miss several periods.
    stuck = rf"Stuck: rank 1 on {re.escape(host)} \(pid \d+\) in step at step (\d+),"
    match = re.search(stuck, line)
    assert match and 1 <= int(match.group(1)) <= 4, line
    assert "Exiting with status 4" in line
    # The stopped rank was ended (SIGKILL) rather than left holding its memory.
    pid = int(re.search(r"rank 1 on \S+ \(pid (\d+)\)", line).group(1))
    assert not os.path.exists(f"/proc/{pid}")
    assert _resumed_from(stderr) == 2  # the step-4 checkpoint was never written
    assert losses(run_dir) == reference_losses  # bf16 on the CPU is deterministic


def test_a_rank_stopped_while_saving_leaves_the_previous_checkpoint_to_resume_from(
    tmp_path, digit_shards, tiny_components, reference_losses
):
    run_dir = tmp_path / "run"
    args = _args(run_dir, digit_shards, tiny_components)
    record, stderr = _fault(run_dir, args, "MMDIT_TEST_STOP_IN", "checkpoint:4:1")
    assert (record["event"], record["section"], record["step"]) == ("hang", "checkpoint", 4)
    assert record["stuck"][0]["rank"] == 1
    assert _resumed_from(stderr) == 2  # the half-written step-4 checkpoint is not used
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert f"step_{STEPS:08d}" in checkpoints
    assert losses(run_dir) == reference_losses


def test_rank_0_stopped_in_validation_is_reported_by_rank_1(
    tmp_path, digit_shards, tiny_components
):
    run_dir = tmp_path / "run"
    args = _args(
        run_dir,
        digit_shards,
        tiny_components,
        **{
            "eval.val_shards": f"{digit_shards}/{{000006..000007}}.tar",
            "eval.val_every": 2,
            "eval.val_samples": 8,
            "eval.sigma_bins": 2,
        },
    )
    record, stderr = _fault(run_dir, args, "MMDIT_TEST_STOP_IN", "eval:2:0")
    assert record["event"] == "hang" and record["step"] == 2
    assert record["stuck"][0]["rank"] == 0 and record["stuck"][0].get("host")
    assert record["reported_by"] == 1  # the lowest rank still alive writes the records
    assert "hang: rank 1 on" in stderr


def test_a_killed_rank_is_named_as_lost_by_the_survivor(tmp_path, digit_shards, tiny_components):
    run_dir = tmp_path / "run"
    args = _args(run_dir, digit_shards, tiny_components)
    # Launched as srun does: torchrun would end the survivor itself when a worker dies.
    record, stderr = _fault(
        run_dir,
        args,
        "MMDIT_TEST_DIE_IN",
        "step:3:1",
        rerun=False,
        bound_s=DEAD_RANK_BOUND_S,
        torchrun=False,
    )
    assert record["stuck"][0]["rank"] == 1 and record["reported_by"] == 0
    assert record["step"] == 3
    # The survivor's next collective fails ("Connection reset by peer" from gloo); the watchdog
    # then finds the rank whose heartbeat stopped.
    assert record["event"] == "peer_lost" and record["error"], record["error"]
    assert "peer lost: a collective failed on rank 0" in stderr and "Silent: rank 1 on" in stderr
