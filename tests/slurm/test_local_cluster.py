"""The local Slurm cluster runs real jobs: srun, sbatch + sacct, requeue, signals, stop."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm.local_cluster import DAEMONS, LocalSlurmCluster, SlurmClusterError, _pid_alive


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


def _gone_from_queue(job_id: str) -> bool:
    return _run("squeue", "-h", "-j", job_id, "-o", "%T").strip() == ""


def _sacct_state(job_id: str) -> str:
    out = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").split()
    return out[-1] if out else ""


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
    _wait(lambda: _gone_from_queue(job), 60, f"job {job} to finish", slurm_cluster)
    assert len(out.read_text().splitlines()) == 2
    # The accounting record may trail the queue by a moment.
    _wait(lambda: _sacct_state(job) == "COMPLETED", 30, "sacct COMPLETED", slurm_cluster)


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
    _wait(lambda: _gone_from_queue(job), 90, f"requeued job {job} to finish", slurm_cluster)
    text = out.read_text()
    assert "restart=0" in text and "restart=1" in text and text.rstrip().endswith("done"), text
    _wait(lambda: _sacct_state(job) == "COMPLETED", 30, "sacct COMPLETED", slurm_cluster)


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
    _wait(lambda: _gone_from_queue(job), 30, f"job {job} to finish", slurm_cluster)
    _wait(lambda: _sacct_state(job) == "COMPLETED", 30, "sacct COMPLETED", slurm_cluster)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_second_cluster_starts_and_stop_leaves_no_daemon(slurm_cluster, tmp_path_factory):
    # A second cluster beside the session one: its own free ports, so they do not collide.
    root = tmp_path_factory.mktemp("slurm2")
    cluster = LocalSlurmCluster(root, cluster_name="mmdit-local-2")
    with cluster:
        assert cluster.is_running()
        pids = cluster.pids()
        assert set(pids) == set(DAEMONS)
        env = {**os.environ, **cluster.env}
        res = subprocess.run(
            ["srun", "-n", "2", "hostname"], env=env, capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 0 and len(res.stdout.splitlines()) == 2, res.stderr
        # A second start under the same root is refused with a clear message.
        with pytest.raises(SlurmClusterError, match="already runs"):
            LocalSlurmCluster(root).start()
    assert not cluster.is_running()
    assert [d for d, pid in pids.items() if _pid_alive(pid)] == []
    assert not any(Path(cluster.pid_file(d)).exists() for d in DAEMONS)
    # The session cluster is unaffected.
    assert slurm_cluster.is_running()
    assert len(_run("srun", "-n", "2", "hostname").splitlines()) == 2
