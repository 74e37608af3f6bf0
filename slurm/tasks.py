"""The callables submitit runs in every task of a job (one task per rank)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from slurm.requeue import EXIT_PREEMPTED, fault_reason, requeue, requeue_or_stop


@dataclass(frozen=True)
class TrainTask:
    argv: tuple[str, ...]
    max_requeues: int
    exclude_bad_nodes: bool = False

    def __call__(self) -> int:
        from training.train import main

        code = main(list(self.argv), on_fault=self.requeue_after_fault)
        if code == EXIT_PREEMPTED:
            is_main = os.environ.get("SLURM_PROCID", "0") == "0"
            requeue_or_stop(self.max_requeues, is_main=is_main)
        if code:
            raise RuntimeError(f"mmdit-train exited with status {code}")
        return code

    def requeue_after_fault(self, report) -> None:
        """The trainer's fault hook: on the rank that reported a hang or a lost peer (its
        training.watchdog.HangReport), requeue the job before every rank exits."""
        record = report.record()
        exclude = report.stuck_hosts() if self.exclude_bad_nodes else []
        requeue(fault_reason(record), self.max_requeues, exclude_nodes=exclude)


# Jobs that resume by being submitted again (finished cache shards and table rows are kept).
RESUMABLE_ENTRIES = {
    "precompute": "data_pipeline.precompute",
    "eval": "eval.evaluate",
}


@dataclass(frozen=True)
class ResumableTask:
    """mmdit-precompute or mmdit-eval on every task; rank and world size come from
    SLURM_PROCID / SLURM_NTASKS. Not requeued: a stopped job is simply submitted again."""

    job: str  # a key of RESUMABLE_ENTRIES
    argv: tuple[str, ...]

    def __call__(self) -> int:
        import importlib

        main = importlib.import_module(RESUMABLE_ENTRIES[self.job]).main
        code = main(list(self.argv))
        if code:
            raise RuntimeError(f"mmdit-{self.job} exited with status {code}")
        return code
