"""`mmdit-train` with test instruments, switched on by environment variables (never in the
product code):

- MMDIT_TEST_NAN_AT="STEP:RANK": rank RANK's loss is NaN at (0-based) step STEP;
  "STEP+:RANK" from STEP on.
- MMDIT_TEST_DUMP_DIR=DIR: after initialisation and after every step, rank 0 writes the full
  fp32 master weights to DIR/weights_{step}.safetensors and whether the update was applied;
  every rank writes a hash of its local fp32 partitions to DIR/partitions_{step}_rank_{r}.txt.
- MMDIT_TEST_KILL_AFTER_STEP=STEP: SIGKILL the whole job (kill -9) right after step STEP;
  STEP@NAME: only in the run whose directory is named NAME (a stage of a chain).
- MMDIT_TEST_SIGNAL_AFTER_STEP=STEP: every rank sends itself SIGUSR2 right after step STEP
  (what Slurm's --signal=USR2@LEAD does before a time limit).
- MMDIT_TEST_KILL_IN_SAVE_AT=STEP: SIGKILL the whole job while the checkpoint of STEP is being
  written (after the shards, before the manifest).
- MMDIT_TEST_STOP_IN="SECTION:STEP:RANK": rank RANK sends itself SIGSTOP (what a wedged GPU
  or a stuck file system looks like to its peers) when it enters watchdog section SECTION
  (setup, step, checkpoint, eval) at step STEP, after writing the time to RUN/stopped_at.
- MMDIT_TEST_DIE_IN="SECTION:STEP:RANK": the same, with SIGKILL (a rank that dies).
- MMDIT_TEST_SLOW="compute:RANK:SECONDS,data:RANK:SECONDS": rank RANK sleeps SECONDS in every
  transformer block's forward (a slow device) or before every batch it takes from its loader
  (a slow file system); either part may be left out.
- MMDIT_TEST_DUMP_LOSS_INPUTS=DIR: every rank saves the inputs and outputs of its loss at
  (0-based) step 0 (x0, context, pooled, the noise generator's state before the draws, the
  per-sample loss and sigma) to DIR/loss_inputs_rank_{r}.pt, to recompute it with another model.
- MMDIT_TEST_COUNT_SYNCS=DIR: count the calls that make the host wait for the device
  (Tensor.item/tolist/cpu/numpy/__bool__/__float__/__int__, torch.cuda.synchronize) made
  inside each optimizer step (Trainer.train_step: micro batches, backward, update, EMA), by
  the file, line and function that made them; every rank writes DIR/syncs_rank_{r}.json as
  {step: {"file:line function": count}}.
- MMDIT_TEST_SIGMA_DUMP=DIR: every rank appends one JSON line per micro batch to
  DIR/sigmas_rank_{r}.jsonl: step, latent shape, the sigmas the loss used and the unshifted
  sigmas the same generator state draws (sample_sigmas without train.shift).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from training import checkpoint, train
from training.trainer import Trainer

nan_at = os.environ.get("MMDIT_TEST_NAN_AT")
dump_dir = os.environ.get("MMDIT_TEST_DUMP_DIR")
kill_at = os.environ.get("MMDIT_TEST_KILL_IN_SAVE_AT")
kill_after = os.environ.get("MMDIT_TEST_KILL_AFTER_STEP")


def kill_job() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


if nan_at:
    when, nan_rank = nan_at.split(":")
    nan_step, onwards, nan_rank = int(when.rstrip("+")), when.endswith("+"), int(nan_rank)
    original_loss = Trainer.compute_loss

    def compute_loss(self, x0, context, pooled, generator):
        loss, sigma = original_loss(self, x0, context, pooled, generator)
        hit = self.step >= nan_step if onwards else self.step == nan_step
        if hit and self.rank == nan_rank:
            loss = loss * float("nan")
        return loss, sigma

    Trainer.compute_loss = compute_loss

if dump_dir:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    out = Path(dump_dir)
    out.mkdir(parents=True, exist_ok=True)

    def dump(trainer: Trainer, applied: bool | None) -> None:
        params = dict(trainer.engine.module.named_parameters())
        digest = hashlib.sha256()
        for name in sorted(params):
            digest.update(safe_get_local_fp32_param(params[name]).detach().numpy().tobytes())
        part = out / f"partitions_{trainer.step}_rank_{trainer.rank}.txt"
        part.write_text(digest.hexdigest())
        # The fp32 master weights (what the EMA follows), gathered: a collective.
        full = {n: safe_get_full_fp32_param(p).clone().contiguous() for n, p in params.items()}
        if trainer.rank == 0:
            save_file(full, str(out / f"weights_{trainer.step}.safetensors"))
            meta = {"applied": applied}
            (out / f"weights_{trainer.step}.json").write_text(json.dumps(meta))

    original_init, original_step = Trainer.__init__, Trainer.train_step

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        dump(self, None)

    def train_step(self, batches):
        applied = original_step(self, batches)
        dump(self, applied)
        return applied

    Trainer.__init__, Trainer.train_step = init, train_step

loss_inputs = os.environ.get("MMDIT_TEST_DUMP_LOSS_INPUTS")
if loss_inputs:
    import torch

    recorded_loss = Trainer.compute_loss

    def compute_loss_recorded(self, x0, context, pooled, generator):
        state = generator.get_state()
        loss, sigma = recorded_loss(self, x0, context, pooled, generator)
        if self.step == 0:
            out = Path(loss_inputs)
            out.mkdir(parents=True, exist_ok=True)
            tensors = {"x0": x0, "context": context, "pooled": pooled, "loss": loss}
            record = {k: v.detach().cpu() for k, v in {**tensors, "sigma": sigma}.items()}
            record["generator"] = state.cpu()
            torch.save(record, out / f"loss_inputs_rank_{self.rank}.pt")
        return loss, sigma

    Trainer.compute_loss = compute_loss_recorded

if kill_at:
    # training.checkpoint calls the manifest writer it imported from mmdit.checkpoints: patch
    # that name (a patch of an attribute that no longer exists would only break the import).
    original_manifest = checkpoint.write_manifest

    def write_manifest(directory, step, world_size, files):
        if step == int(kill_at):
            kill_job()
        original_manifest(directory, step, world_size, files)

    checkpoint.write_manifest = write_manifest

if kill_after:
    before_kill = Trainer.train_step

    kill_step, _, kill_in = kill_after.partition("@")

    def train_step_then_kill(self, batches):
        applied = before_kill(self, batches)
        if self.step == int(kill_step) and kill_in in ("", self.run_dir.name):
            kill_job()
        return applied

    Trainer.train_step = train_step_then_kill

count_syncs = os.environ.get("MMDIT_TEST_COUNT_SYNCS")
if count_syncs:
    import collections

    import torch

    sync_out = Path(count_syncs)
    sync_out.mkdir(parents=True, exist_ok=True)
    in_step: list[collections.Counter] = []  # the current step's counter while one runs

    def counting(original):
        def wrapper(*args, **kwargs):
            if in_step:
                caller = sys._getframe(1)
                code = caller.f_code
                in_step[-1][f"{code.co_filename}:{caller.f_lineno} {code.co_qualname}"] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    torch.cuda.synchronize = counting(torch.cuda.synchronize)
    counted_step = Trainer.train_step
    per_step: dict[int, dict[str, int]] = {}

    def train_step_counting_syncs(self, batches):
        in_step.append(collections.Counter())
        try:
            return counted_step(self, batches)
        finally:
            per_step[self.step] = dict(in_step.pop())
            path = sync_out / f"syncs_rank_{self.rank}.json"
            path.write_text(json.dumps(per_step, indent=1, sort_keys=True))

    Trainer.train_step = train_step_counting_syncs

for variable, sig in (
    ("MMDIT_TEST_STOP_IN", signal.SIGSTOP),
    ("MMDIT_TEST_DIE_IN", signal.SIGKILL),
):
    if os.environ.get(variable):
        from training.watchdog import Watchdog

        where, at_step, at_rank = os.environ[variable].split(":")

        def enter_then_signal(
            self,
            section,
            step=None,
            *,
            _enter=Watchdog.enter,
            _sig=sig,
            _where=where,
            _step=int(at_step),
            _rank=int(at_rank),
        ):
            _enter(self, section, step)
            if (self.rank, section, self._step) == (_rank, _where, _step):
                (self.run_dir / "stopped_at").write_text(repr(time.time()))
                os.kill(os.getpid(), _sig)

        Watchdog.enter = enter_then_signal

slow = os.environ.get("MMDIT_TEST_SLOW")
if slow:
    from mmdit.model import JointBlock

    for part in slow.split(","):
        what, slow_rank, seconds = part.split(":")
        if int(slow_rank) != int(os.environ.get("RANK", "0")):
            continue
        if what == "compute":

            def slow_forward(self, *args, _forward=JointBlock.forward, _s=float(seconds), **kw):
                time.sleep(_s)
                return _forward(self, *args, **kw)

            JointBlock.forward = slow_forward
        else:

            class SlowBatches:
                def __init__(self, batches, seconds):
                    self.batches, self.seconds = batches, seconds

                def __next__(self):
                    time.sleep(self.seconds)
                    return next(self.batches)

            def slow_next_batch(self, batches, _next=Trainer._next_batch, _s=float(seconds)):
                return _next(self, SlowBatches(batches, _s))

            Trainer._next_batch = slow_next_batch

signal_after = os.environ.get("MMDIT_TEST_SIGNAL_AFTER_STEP")
if signal_after:
    before_signal = Trainer.train_step

    def train_step_then_signal(self, batches):
        applied = before_signal(self, batches)
        if self.step == int(signal_after):
            os.kill(os.getpid(), signal.SIGUSR2)
        return applied

    Trainer.train_step = train_step_then_signal

sigma_dump = os.environ.get("MMDIT_TEST_SIGMA_DUMP")
if sigma_dump:
    import torch

    from mmdit import flow

    sigma_out = Path(sigma_dump)
    sigma_out.mkdir(parents=True, exist_ok=True)
    loss_before_dump = Trainer.compute_loss

    def compute_loss_recorded(self, x0, context, pooled, generator):
        before = generator.get_state()
        loss, sigma = loss_before_dump(self, x0, context, pooled, generator)
        again = torch.Generator(generator.device)
        again.set_state(before)
        t = self.train
        unshifted = flow.sample_sigmas(
            x0.shape[0],
            t.sigma_density,
            logit_mean=t.logit_mean,
            logit_std=t.logit_std,
            mode_scale=t.mode_scale,
            generator=again,
            device=x0.device,
        )
        row = {
            "step": self.step,
            "shape": list(x0.shape),
            "sigma": sigma.tolist(),
            "unshifted": unshifted.tolist(),
        }
        with open(sigma_out / f"sigmas_rank_{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return loss, sigma

    Trainer.compute_loss = compute_loss_recorded


if __name__ == "__main__":
    sys.exit(train.main())
