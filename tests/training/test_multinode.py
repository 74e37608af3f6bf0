"""A 2-node job for real: two torchrun agents (each a "node" with one rank) meet through a c10d
rendezvous on this host, train, and the run resumes on one node with two ranks. Each agent
sets its own node rank, local rank 0 and local world size 1, so the trainer cannot take
its node's ranks for the whole world (DeepSpeed's CPU accelerator uses its shared-memory
collectives only when every rank is on one node). The losses of both parts are those of a
one-node job, exactly (bf16 on the CPU is deterministic; the sum of two ranks' gradients does
not depend on the order)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

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

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

FIRST_PART = 4  # steps on two nodes; the rest of the reference job's steps on one


def run_two_nodes(args: list[str], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents, one rank each, that find each other through a c10d rendezvous
    on 127.0.0.1, as two nodes of a cluster do through the first node's address."""
    port = free_ports(1)[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        f"--rdzv_id={uuid.uuid4().hex[:8]}",
    ]
    agents = [
        subprocess.Popen(
            [*common, f"--node_rank={node}", str(INSTRUMENTED), *args],
            cwd=REPO,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    results = []
    for agent in agents:
        out, err = agent.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    return results


def test_two_nodes_train_and_the_run_resumes_on_one_node_on_the_same_curve(
    tmp_path, digit_shards, tiny_components, reference_losses
):
    run_dir = tmp_path / "two_nodes"
    first = {"train.max_steps": FIRST_PART}
    agents = run_two_nodes(reference_args(run_dir, digit_shards, tiny_components, **first))
    for agent in agents:
        assert agent.returncode == 0, agent.stderr[-3000:]
    stderr = "\n".join(a.stderr for a in agents)
    # One rank per node: each agent started local rank 0 of a world of 2.
    assert "world 2 x micro 2 x accumulation 1" in stderr, stderr[-3000:]
    assert max(read_metrics(run_dir)) == FIRST_PART

    again = run_training(2, reference_args(run_dir, digit_shards, tiny_components), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoints/step_{FIRST_PART:08d}" in again.stderr  # resumed, not restarted
    assert sorted(losses(run_dir)) == list(range(1, REFERENCE_STEPS + 1))
    assert losses(run_dir) == reference_losses  # the reference job: one node, 2 ranks
