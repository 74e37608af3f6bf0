"""The local Slurm cluster runs real jobs: srun, sbatch + sacct, requeue, signals, stop."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm.job_state import JobStateTimeout, wait_for_final_state
from slurm.local_cluster import (
    DAEMONS,
    LocalSlurmCluster,
    SlurmClusterError,
    _pid_alive,
    _running_first_job_ids,
)
from slurm.submit import job_is_alive
from tests.slurm.conftest import job_port


def _run(*argv: str, timeout: float = 30) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.returncode}\n{res.stdout}{res.stderr}"
    return res.stdout


def _sbatch(*args: str) -> str:
    return _run("sbatch", "--parsable", *args).strip().split(";")[0]


def _wait(cond, timeout: float, what: str, cluster: LocalSlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{cluster.log_tails()}")
        time.sleep(0.2)


def _final_state(job_id: str, timeout: float, cluster: LocalSlurmCluster, **kw) -> str:
    try:
        return wait_for_final_state(job_id, timeout, poll_s=0.2, **kw)
    except JobStateTimeout as e:
        pytest.fail(f"{e}\n{cluster.log_tails()}")


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_srun_two_tasks(slurm_cluster):
    out = _run("srun", "-n", "2", "hostname")
    assert len(out.splitlines()) == 2


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_sbatch_two_tasks_completes_in_sacct(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = _sbatch("-n", "2", "-o", str(out), "--wrap", "srun hostname")
    assert _final_state(job, 60, slurm_cluster) == "COMPLETED"
    assert len(out.read_text().splitlines()) == 2
    # submitit follows jobs through sacct alone: its record (which trails) must get there too.
    assert _final_state(job, 30, slurm_cluster, accounting_only=True) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_failed_and_cancelled_jobs_end_in_those_states_in_both_sources(slurm_cluster, tmp_path):
    failed = _sbatch("-o", str(tmp_path / "failed.out"), "--wrap", "exit 3")
    sleeper = _sbatch("-o", str(tmp_path / "sleeper.out"), "--wrap", "sleep 100")
    assert job_is_alive(sleeper)
    _run("scancel", sleeper)
    for job, final in ((failed, "FAILED"), (sleeper, "CANCELLED")):
        assert _final_state(job, 60, slurm_cluster) == final
        # sacct says "CANCELLED by 0": the same state once parsed.
        assert _final_state(job, 30, slurm_cluster, accounting_only=True) == final
    assert not job_is_alive(sleeper)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_requeued_job_runs_again(slurm_cluster, tmp_path):
    out = tmp_path / "requeue.out"
    script = (
        'echo "restart=${SLURM_RESTART_COUNT:-0}"; '
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 100; fi; echo done'
    )
    job = _sbatch("--requeue", "--open-mode=append", "-o", str(out), "--wrap", script)
    _wait(
        lambda: out.exists() and "restart=0" in out.read_text(),
        60,
        f"job {job} to start",
        slurm_cluster,
    )
    _run("scontrol", "requeue", job)
    assert job_is_alive(job)  # requeued: pending again, not gone
    # REQUEUED is not final: the wait goes on through the second run.
    assert _final_state(job, 90, slurm_cluster) == "COMPLETED"
    text = out.read_text()
    assert "restart=0" in text and "restart=1" in text and text.rstrip().endswith("done"), text
    assert _final_state(job, 30, slurm_cluster, accounting_only=True) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_scancel_signal_reaches_tasks(slurm_cluster, tmp_path):
    task = (
        f'trap "echo usr2 > {tmp_path}/got.$SLURM_PROCID; exit 0" USR2; '
        f"echo up > {tmp_path}/up.$SLURM_PROCID; "
        "for i in $(seq 900); do sleep 0.1; done; exit 3"
    )
    job = _sbatch("-n", "2", "-o", str(tmp_path / "job.out"), "--wrap", f"srun bash -c '{task}'")
    ready = [tmp_path / f"up.{rank}" for rank in (0, 1)]
    _wait(lambda: all(p.exists() for p in ready), 60, "both tasks up", slurm_cluster)
    _run("scancel", "--signal=USR2", job)
    got = [tmp_path / f"got.{rank}" for rank in (0, 1)]
    _wait(lambda: all(p.exists() for p in got), 30, "USR2 traps to fire", slurm_cluster)
    assert _final_state(job, 30, slurm_cluster) == "COMPLETED"
    assert _final_state(job, 30, slurm_cluster, accounting_only=True) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_second_cluster_starts_and_stop_leaves_no_daemon(slurm_cluster, tmp_path_factory):
    # A second cluster beside the session one: its own free ports, so they do not collide,
    # and its own job ids, so its jobs' rendezvous ports differ from the session cluster's.
    root = tmp_path_factory.mktemp("slurm2")
    cluster = LocalSlurmCluster(root, cluster_name="mmdit-local-2")
    with cluster:
        assert cluster.is_running()
        pids = cluster.pids()
        assert set(pids) == set(DAEMONS)
        assert _running_first_job_ids() >= {slurm_cluster.first_job_id, cluster.first_job_id}
        env = {**os.environ, **cluster.env}
        res = subprocess.run(
            ["srun", "-n", "2", "printenv", "SLURM_JOB_ID"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0 and len(res.stdout.splitlines()) == 2, res.stderr
        theirs = _run("srun", "-n", "1", "printenv", "SLURM_JOB_ID").strip()
        ours = res.stdout.split()[0]
        assert int(ours) >= cluster.first_job_id and int(theirs) >= slurm_cluster.first_job_id
        assert job_port(ours) != job_port(theirs)
        # A second start under the same root is refused with a clear message.
        with pytest.raises(SlurmClusterError, match="already runs"):
            LocalSlurmCluster(root).start()
    assert not cluster.is_running()
    assert [d for d, pid in pids.items() if _pid_alive(pid)] == []
    assert not any(Path(cluster.pid_file(d)).exists() for d in DAEMONS)
    # The session cluster is unaffected.
    assert slurm_cluster.is_running()
    assert len(_run("srun", "-n", "2", "hostname").splitlines()) == 2
