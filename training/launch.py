"""Starting the trainer's process group through DeepSpeed (its accelerator picks the backend:
NCCL on GPUs, gloo on its CPU accelerator)."""

from __future__ import annotations

from datetime import timedelta

import torch

from mmdit.distributed import DistEnv, export_env


def init(dist_env: DistEnv, timeout_s: int = 1800) -> torch.device:
    """Export the torch rendezvous variables, start the process group, return our device."""
    export_env(dist_env)
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
    return device
