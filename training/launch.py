"""Starting the trainer's process group through DeepSpeed (its accelerator picks the backend:
NCCL on GPUs, gloo on its CPU accelerator)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from mmdit.distributed import DistEnv, export_env

log = logging.getLogger(__name__)


def init(dist_env: DistEnv, timeout_s: float = 3600) -> torch.device:
    """Export the torch rendezvous variables, start the process group (collectives time out
    after `timeout_s`, faults.collective_timeout_s), return our device."""
    export_env(dist_env)
    # A collective that times out or fails aborts the communicator and raises, instead of
    # leaving a rank waiting (torch's default; a site that chose another mode keeps it).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    use_environment_extensions()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(dist_env.local_rank)
        device = torch.device("cuda", dist_env.local_rank)
    else:
        device = torch.device(accelerator.device_name())
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(),
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=timeout_s),
        )
        if device.type == "cpu":
            release_shm_buffer(dist_env.rank)
        if dist_env.rank == 0:
            log.info(
                "process group: %s, %d ranks, rendezvous %s:%s (%s), collectives time out "
                "after %g s",
                torch.distributed.get_backend(),
                dist_env.world_size,
                os.environ["MASTER_ADDR"],
                os.environ["MASTER_PORT"],
                dist_env.launcher,
                timeout_s,
            )
    return device


def release_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU accelerator gives each rank of a one-node job a 69 MB shared-memory
    allreduce buffer (/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>) and never
    unlinks it, so every CPU job, finished or killed, left RAM behind: a test session filled
    /dev/shm with 18 GB and got processes OOM-killed. Every rank maps every peer's buffer while
    the process group starts; after a barrier the names can go. The mappings stay valid, and
    the memory returns when the processes exit, however they exit."""
    torch.distributed.barrier()
    name = "_".join(
        [
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(rank),
        ]
    )
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def use_environment_extensions() -> Path:
    """Keep DeepSpeed's JIT-compiled ops (the CPU accelerator's shared-memory collectives) in
    this Python environment (`TORCH_EXTENSIONS_DIR`, unless set) instead of the user-wide
    ~/.cache: a build depends on the environment's include paths, so checkouts sharing one
    cache rebuild over each other's op, and a process killed while building leaves a lock
    that makes the next run wait forever. `make` builds the op once (`build_ops`)."""
    return Path(
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    )


def build_ops() -> None:
    """Compile DeepSpeed's ops that this machine's accelerator loads at start-up, so no
    training run (or test) compiles them. Run by `make setup`."""
    where = use_environment_extensions()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
    print(f"DeepSpeed ops ready in {where}")


if __name__ == "__main__":
    build_ops()
