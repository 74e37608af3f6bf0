"""The `slurm_cluster` fixture: one real local Slurm cluster for the whole test session;
`two_node_cluster`, a 2-node one for the tests that need it; and `job_port`, the rendezvous port
of a job."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from mmdit.distributed import detect
from slurm.local_cluster import LocalSlurmCluster, SlurmClusterError, missing_binaries


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def job_port(job_id: int | str) -> int:
    """The rendezvous port a task of this Slurm job takes (the product's rule)."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": str(job_id)}
    return detect({**env, "MASTER_ADDR": "127.0.0.1"}).master_port


def _started(tmp_path_factory, nodes: int = 1) -> LocalSlurmCluster:
    """A running LocalSlurmCluster. Never skipped: CI runs the `slurm` tests, so missing
    programs are a failure."""
    missing = missing_binaries()
    if missing:
        pytest.fail(
            f"the local Slurm cluster needs {', '.join(missing)}: run `make slurm-deps` "
            "(as root: scripts/install_slurm.sh)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("the local Slurm cluster must be started as root", pytrace=False)
    root = tmp_path_factory.mktemp("slurm", numbered=True)
    cluster = LocalSlurmCluster(root, nodes=nodes)
    t0 = time.monotonic()
    try:
        cluster.start()
    except SlurmClusterError as exc:
        pytest.fail(f"could not start the local Slurm cluster:\n{exc}", pytrace=False)
    print(f"\nlocal {nodes}-node Slurm cluster under {root} up in {time.monotonic() - t0:.1f} s")
    return cluster


@contextlib.contextmanager
def _stopped_on_exit(cluster: LocalSlurmCluster):
    # A SIGTERM (a CI time limit, `timeout`) would end pytest without this finalizer and leave
    # the daemons running; as an interrupt, pytest unwinds and the cluster is stopped.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield cluster
    finally:
        signal.signal(signal.SIGTERM, previous)
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running 1-node LocalSlurmCluster; its env (SLURM_CONF) is in os.environ for the
    session."""
    cluster = _started(tmp_path_factory)
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        with _stopped_on_exit(cluster):
            yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A running 2-node LocalSlurmCluster (nodes 127.0.0.1 and 127.0.0.2, two slurmd); a test
    points SLURM_CONF at it (monkeypatch) for the commands it runs."""
    with _stopped_on_exit(_started(tmp_path_factory, nodes=2)) as cluster:
        yield cluster
