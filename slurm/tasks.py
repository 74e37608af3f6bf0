"""The callables submitit runs in every task of a job (one task per rank)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from slurm.requeue import EXIT_PREEMPTED, requeue_or_stop


@dataclass(frozen=True)
class TrainTask:
    argv: tuple[str, ...]
    max_requeues: int

    def __call__(self) -> int:
        from training.train import main

        code = main(list(self.argv))
        if code == EXIT_PREEMPTED:
            is_main = os.environ.get("SLURM_PROCID", "0") == "0"
            requeue_or_stop(self.max_requeues, is_main=is_main)
        if code:
            raise RuntimeError(f"mmdit-train exited with status {code}")
        return code


@dataclass(frozen=True)
class PrecomputeTask:
    """mmdit-precompute on every task; rank and world size come from SLURM_PROCID/NTASKS.
    Resumable (finished cache shards are skipped), so a preempted job is simply resubmitted."""

    argv: tuple[str, ...]

    def __call__(self) -> int:
        from data_pipeline.precompute import main

        code = main(list(self.argv))
        if code:
            raise RuntimeError(f"mmdit-precompute exited with status {code}")
        return code
