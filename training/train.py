"""`mmdit-train`: pretrain an MMDiT with rectified flow on DeepSpeed ZeRO-3.

    mmdit-train --config configs/debug_cpu.yaml                       # one process
    torchrun --nproc_per_node 2 -m training.train --config configs/debug_cpu.yaml
    deepspeed --num_gpus 8 -m training.train --config configs/d24_512px.yaml
    srun mmdit-train --config configs/d24_512px.yaml train.run_dir=/runs/d24   # in sbatch

A run file with a top-level `stages:` list trains its stages in order, each in
TRAIN.RUN_DIR/NAME and starting from the previous stage's final weights (training.stages);
rerunning the command skips finished stages and resumes the current one.

Start from existing weights (weights only; step 0, fresh optimizer and data state) with
train.init_from=RUN, RUN:STEP, a diffusers SD3Transformer2DModel folder, an SD3/SD3.5 single
file or an mmdit-export file (train.init_weights=ema|raw for runs; default ema).

The same command resumes: on start, the run continues from the newest intact checkpoint in
train.run_dir by itself (a damaged one is skipped for the one before). Resuming on another
number of ranks is supported when train.global_batch_size is set (DeepSpeed universal
checkpoint; the data stream continues where it was).

Touch RUN/CHECKPOINT_NOW to get a checkpoint at the next step. SIGUSR2 or SIGTERM makes every
rank checkpoint at the next step and exit with status 3 (resubmit to continue).

A rank that stops making progress (the `faults.*_timeout_s` limits for set-up, a step, a
checkpoint, validation) or dies makes every rank exit with status 4 after one log line naming
it; RUN/faults.jsonl keeps the record. Under torchrun, `--max-restarts N` restarts the job
and it resumes from the last complete checkpoint; under mmdit-submit the job requeues itself.

A checkpoint that cannot be written (disk full, quota, I/O error) is reported in one line and
in RUN/faults.jsonl and never published; training goes on and tries again at the next
checkpoint step (faults.on_checkpoint_error=continue), or stops with status 5 (=stop). Status
5 also ends a run whose final checkpoint failed: fix the storage and rerun to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mmdit.typed_config import ConfigError, add_config_arguments, config_from_args
from training.config import RunConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmdit-train",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING"],
        help="console verbosity",
    )
    # The `deepspeed` launcher appends --local_rank=N; the rank comes from LOCAL_RANK anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, *, on_fault=None) -> int:
    """Exit status: 0 done, 3 checkpointed on a signal (resubmit), 4 a rank hung or died
    (training.watchdog; restart from the last checkpoint), 5 a checkpoint could not be
    written (fix the storage, then rerun). `on_fault(report)` runs on the rank that reports a
    hang, before the exit (slurm.tasks uses it to requeue)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from training.stages import has_stages, load_stages, run_stages

    try:
        stages = load_stages(args.config, args.overrides) if has_stages(args.config) else None
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    config = None if stages else config_from_args(RunConfig, args, parser)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Imported after parsing so `--help` is instant and config errors come before DeepSpeed.
    from training.init_from import InitFromError
    from training.trainer import StopFlag, Trainer

    try:
        if stages:
            return run_stages(stages, stop_flag=StopFlag(), on_fault=on_fault)
        trainer = Trainer(config, stop_flag=StopFlag(), on_fault=on_fault)
    except InitFromError as e:  # raised on every rank together, before training
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return trainer.fit()


if __name__ == "__main__":
    sys.exit(main())
