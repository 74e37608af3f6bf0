"""`torchrun ... find_checkpoint.py RUN_DIR`: every rank looks for the newest checkpoint all
ranks agree is intact and prints `rank R chose NAME` (NAME is None when there is none)."""

from __future__ import annotations

import sys

import torch.distributed as dist

from training.checkpoint import CheckpointManager


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    found = CheckpointManager(sys.argv[1], keep=3, rank=rank, world_size=world).find_resumable()
    print(f"rank {rank} chose {found.path.name if found else None}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
