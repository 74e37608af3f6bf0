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
    REPO,
    read_metrics,
    run_training,
    train_overrides,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, FIRST_PART = 6, 4


def _args(run_dir, digit_shards, tiny_components, max_steps: int) -> list[str]:
    settings = {
        "train.max_steps": max_steps,
        "train.checkpoint_every": 2,
        "train.precision": "bf16",
    }
    return [
        "--config",
        "configs/debug_cpu.yaml",
        *train_overrides(run_dir, digit_shards, tiny_components, **settings),
    ]


def _losses(run_dir) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_metrics(run_dir).items() if "loss" in row}


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
    tmp_path, digit_shards, tiny_components
):
    reference = tmp_path / "one_node"
    result = run_training(2, _args(reference, digit_shards, tiny_components, STEPS), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = tmp_path / "two_nodes"
    agents = run_two_nodes(_args(run_dir, digit_shards, tiny_components, FIRST_PART))
    for agent in agents:
        assert agent.returncode == 0, agent.stderr[-3000:]
    stderr = "\n".join(a.stderr for a in agents)
    # One rank per node: each agent started local rank 0 of a world of 2.
    assert "world 2 x micro 2 x accumulation 1" in stderr, stderr[-3000:]
    assert max(read_metrics(run_dir)) == FIRST_PART

    again = run_training(2, _args(run_dir, digit_shards, tiny_components, STEPS), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoints/step_{FIRST_PART:08d}" in again.stderr  # resumed, not restarted
    assert _losses(run_dir) == _losses(reference)
