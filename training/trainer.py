"""The rectified-flow training loop on DeepSpeed ZeRO-3.

One step = `accumulation` micro batches per rank, one optimizer update. The loop never waits
for the device except where DeepSpeed already does (its global gradient norm decides whether
an update is applied): losses are summed per sigma bin on the device and reduced across ranks
only at log steps.

Determinism: the noise, sigma and CFG-dropout draws of micro batch i of step s come from
generators seeded by (train.seed, s, i * world + rank), i.e. by the sample's position in the
global batch, not by process history. A resumed run therefore needs no generator state to
continue the same loss curve, and a run resumed on another world size with the same global
batch draws the same numbers for the same samples (the loader keeps the sample order, see
data_pipeline.loader.reshard_state).

Skipped updates: a non-finite gradient norm on any rank (DeepSpeed reduces the norm over all
ranks, so all agree) leaves the weights, optimizer and EMA unchanged; the step still counts,
its batch is consumed (replaying it would most likely fail again) and the learning-rate
schedule follows the step counter. After `train.max_consecutive_skips` skipped steps in a row
the run stops with the offending batch keys written to RUN/nonfinite/.

Size: this module is the one class that orders set-up, the step, the loop and checkpoints
(~650 lines, kept whole so the loop reads top-down in one place); the parts with a purpose of
their own live beside it: model_build (initial weights), log_window (per-window accounting),
rng_state (seeds and saved RNG state), checkpoint_failure (the storage-fault report).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from data_pipeline import build_loader
from data_pipeline.bad_samples import REASONS
from data_pipeline.batches import Batch
from data_pipeline.buckets import Bucket
from data_pipeline.loader import reshard_state
from data_pipeline.model_inputs import ModelInputs
from mmdit import distributed, flow
from mmdit.checkpoints import DS_TAG
from mmdit.conditioning import conditioning_identity
from mmdit.conditioning.vae import SPATIAL_FACTOR
from mmdit.flops import mfu, peak_bf16_flops
from mmdit.typed_config import dumps_yaml, to_dict
from training import init_from, launch
from training.checkpoint import Checkpoint, CheckpointManager, CheckpointWriteError
from training.checkpoint_failure import report_checkpoint_failure
from training.config import RunConfig
from training.ds_config import accumulation_steps, deepspeed_config
from training.ema import ShardedEMA
from training.log_window import LogWindow
from training.lora import add_lora, attach_frozen_base
from training.metrics_log import PREVIEW_TAG, MetricsLogger
from training.model_build import build_model
from training.optim import build_optimizer, lr_at, repair_after_load
from training.regional_compile import compile_blocks, compile_count
from training.rng_state import micro_batch_seed, rng_state, set_rng_state
from training.stragglers import BlockTimer, StragglerReport
from training.watchdog import HangReport, Limits, Watchdog

log = logging.getLogger("mmdit.train")

EXIT_DONE = 0
EXIT_PREEMPTED = 3  # checkpointed on request/signal before max_steps; resubmit to continue
# A checkpoint could not be written (disk full, quota, I/O error) and the run stopped
# (faults.on_checkpoint_error=stop), or its final checkpoint, or the one a signal asked for,
# failed: fix the storage, then rerun to resume from the last checkpoint. Not requeued.
EXIT_STORAGE = 5
CHECKPOINT_REQUEST_FILE = "CHECKPOINT_NOW"  # touch RUN/CHECKPOINT_NOW to get one
MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    pass


class StopFlag:
    """Set by SIGUSR2 (Slurm's warning before a time limit or preemption) or SIGTERM; only
    sets a flag, so the handler is safe at any point; the loop acts at a step boundary."""

    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signum


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        *,
        stop_flag: StopFlag | None = None,
        on_fault: Callable[[HangReport], None] | None = None,
    ):
        """`on_fault`: what the launcher does after a hang or a lost peer is reported
        (training.watchdog); on Slurm, requeue the job."""
        self.config = config
        self.on_fault = on_fault
        self.train = config.train
        self.stop_flag = stop_flag
        self.env = distributed.detect()
        self.device = launch.init(self.env, config.faults.collective_timeout_s)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.run_dir = Path(self.train.run_dir)
        self.accumulation = accumulation_steps(self.train, self.world)
        self.global_batch = self.train.micro_batch_size * self.accumulation * self.world
        self.checkpoints = CheckpointManager(
            self.run_dir, self.train.keep_checkpoints, self.rank, self.world
        )
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        self.watchdog = self._start_watchdog()
        self.checkpoints.remove_stale_temporaries()
        self.resume_from = self.checkpoints.find_resumable()
        self.init_source = self._read_init_source()
        self._build_engine()
        self._build_data()
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.skipped_keys: list[dict] = []
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.metrics = MetricsLogger(
            self.run_dir,
            is_writer=self.rank == 0,
            max_steps=self.train.max_steps,
            resume_step=self.step,
            wandb_project=self.train.wandb_project,
            wandb_entity=self.train.wandb_entity,
            wandb_mode=self.train.wandb_mode,
            run_name=self.run_dir.name,
            config=to_dict(self.config),
            config_yaml=dumps_yaml(self.config),
        )
        if self.init_source is not None:
            self.metrics.log(0, self.init_source.record)  # what this run started from
        self.validator = None
        if self.config.eval.val_every and self.config.eval.val_shards:
            from training.validation import Validator

            self.validator = Validator(self.config, self.inputs, self.device, self.rank)
        self.previewer = None
        if self.train.preview_every:
            from training.preview import Previewer

            self.previewer = Previewer(
                self.config, self.inputs.vae, self.device, self.rank, self.inputs.text
            )
        self.window = LogWindow(
            self.config.eval.sigma_bins, len(self.loader.stream.resolutions), self.device
        )
        self._reset_log_window()

    # -- set-up -------------------------------------------------------------------------------

    def _start_watchdog(self) -> Watchdog:
        f = self.config.faults
        limits = Limits(
            setup=f.setup_timeout_s,
            step=f.step_timeout_s,
            checkpoint=f.checkpoint_timeout_s,
            eval=f.eval_timeout_s,
            step_factor=f.step_timeout_factor,
        )
        return Watchdog(
            self.run_dir,
            self.rank,
            self.world,
            limits,
            heartbeat_s=f.heartbeat_s,
            incarnation=distributed.broadcast_object(uuid.uuid4().hex),  # rank 0's token
            on_fault=self.on_fault,
        ).start()

    def _read_init_source(self) -> init_from.InitSource | None:
        """train.init_from's weights (rank 0 reads them), unless the run resumes: its own
        checkpoint always wins, so a requeued job never starts over from the source."""
        spec = self.train.init_from
        if not spec:
            return None
        if self.resume_from is not None:
            if self.rank == 0:
                log.info(
                    "train.init_from=%s ignored: the run resumes from its own checkpoint %s",
                    spec,
                    self.resume_from.path,
                )
            return None
        source = init_from.read_source(spec, self.train.init_weights, self.config.model, self.rank)
        if self.rank == 0:
            r = source.record
            log.info(
                "initialising from %s (%s, %s weights, step %s, hash %s); optimizer, data and "
                "step start fresh",
                r["source"],
                r["kind"],
                r["weights"],
                r["source_step"],
                r["hash"],
            )
        return source

    def _build_engine(self) -> None:
        import deepspeed

        universal = self.resume_from is not None and self.resume_from.world_size != self.world
        self.load_tag = DS_TAG
        if universal:
            self.load_tag = self.checkpoints.ensure_universal(self.resume_from)
        self.ds_config = deepspeed_config(self.config, self.world, load_universal=universal)
        model = build_model(
            self.config.model,
            self.ds_config,
            seed=self.train.seed,
            zero3=self.train.zero_stage >= 3,
            init_source=self.init_source,
            rank=self.rank,
        )
        t = self.train
        # After the base weights exist, before DeepSpeed sees the module tree (training.lora).
        model = add_lora(model, self.config.lora, t.seed)
        model.set_activation_checkpointing(
            t.activation_checkpointing, t.activation_checkpointing_every
        )
        if t.compile:
            compile_blocks(model)
        optimizer = build_optimizer(model, t, self.device)
        self.group_names = tuple(g["name"] for g in optimizer.param_groups)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config
        )
        self.model_dtype = MODEL_DTYPES[t.precision]
        if self.init_source is not None:
            if self.config.lora.rank:
                # The loaded base is frozen (no fp32 master copy) and the adapters are new.
                self.init_source.state_dict = None
            else:  # exact fp32 values, before the EMA copies them
                init_from.copy_into_master_weights(
                    self.engine, self.init_source, self.rank, self.world, self.device
                )
        # The EMA follows the optimizer's fp32 masters, so the trained parameters only: all of
        # them, or a LoRA's adapters (the frozen base needs no average: it never changes).
        trained = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        self.ema = ShardedEMA(trained, t.ema_decay, self.rank, self.world)
        attach_frozen_base(self.ema, self.engine.module, self.config, self.rank)
        # After deepspeed.initialize: the timer's hooks must run after ZeRO-3's gather hooks.
        self.block_timer = BlockTimer(self.engine.module.blocks, self.device)
        f = self.config.faults
        self.stragglers = StragglerReport(
            distributed.gather_objects(socket.gethostname()),
            f.straggler_factor,
            f.straggler_windows,
            warn=self.rank == 0,
        )

    def _build_data(self) -> None:
        data = self.config.data
        if self.resume_from is not None:
            # Keep the checkpoint's number of readers (ranks x workers), so every reader's
            # stream continues exactly, on this world size too.
            saved = self.resume_from.client_state(0)["loader"]
            readers = int(saved["world_size"]) * int(saved["num_workers"])
            if readers % self.world:
                raise ValueError(
                    f"the checkpoint's data stream has {readers} readers (ranks x "
                    f"data.num_workers), which {self.world} ranks cannot share evenly; resume "
                    "on a world size that divides it"
                )
            if max(1, data.num_workers) * self.world != readers:
                log.warning(
                    "rank %d: data.num_workers %d -> %d to continue the checkpoint's %d readers",
                    self.rank,
                    data.num_workers,
                    readers // self.world,
                    readers,
                )
                data = replace(data, num_workers=readers // self.world)
        self.data_config = data
        cond = self.config.conditioning
        identity = None
        if data.cache_shards:
            identity = conditioning_identity(
                cond.components,
                cond.paths(),
                use_t5=cond.use_t5,
                t5_max_length=cond.t5_max_length,
            )
        self.loader = build_loader(
            data,
            self.rank,
            self.world,
            batch_size=self.train.micro_batch_size,
            expected_identity=identity,
            pin_memory=self.device.type == "cuda",
        )
        cache_dir = Path(self.loader.stream.shards[0]).parent if data.cache_shards else None
        self.inputs = ModelInputs(
            cond,
            text_dropout=self.train.text_dropout,
            device=self.device,
            cache_info=self.loader.cache_info,
            cache_dir=cache_dir,
        )

    def _load(self, checkpoint: Checkpoint) -> None:
        log.info("rank %d: resuming from %s", self.rank, checkpoint.path)
        path, _ = self.engine.load_checkpoint(
            str(checkpoint.path),
            tag=self.load_tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {checkpoint.path / self.load_tag}")
        repair_after_load(self.engine.optimizer.optimizer, self.train, self.group_names)
        self.ema.bind()  # loading may have replaced the optimizer's flat fp32 buffers
        self.ema.load(checkpoint.path)
        if checkpoint.world_size == self.world:
            client = checkpoint.client_state(self.rank)
            loader_state = client["loader"]
        else:
            states = checkpoint.client_states()
            client = states[self.rank] if self.rank < len(states) else states[0]
            loader_state = reshard_state(
                [s["loader"] for s in states], self.rank, self.world, self.data_config.num_workers
            )
        self.loader.load_state_dict(loader_state)
        set_rng_state(client["rng"])
        self.step = int(client["step"])
        self.skipped_total = int(client["skipped_total"])
        self.consecutive_skips = int(client["consecutive_skips"])

    # -- the loop -----------------------------------------------------------------------------

    def _reset_log_window(self) -> None:
        self.window.reset()
        self.block_timer.read_and_reset()

    def _next_batch(self, batches) -> Batch:
        t0 = time.perf_counter()
        batch = next(batches)
        self.window.data_wait += time.perf_counter() - t0
        return batch

    def _model_fn(self, x, sigma, context, pooled):
        dt = self.model_dtype
        return self.engine(x.to(dt), sigma, context.to(dt), pooled.to(dt))

    def train_step(self, batches) -> bool:
        """One optimizer step over `accumulation` micro batches; True if it was applied."""
        t = self.train
        lr = lr_at(self.step, t)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        step_bins = self.window.new_step_bins()
        keys = []
        for micro in range(self.accumulation):
            batch = self._next_batch(batches)
            keys.append(batch.keys)
            seed = micro_batch_seed(t.seed, self.step, micro * self.world + self.rank)
            noise_gen = torch.Generator(self.device).manual_seed(seed)
            cpu_gen = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
            x0, context, pooled = self.inputs(batch, noise_gen, cpu_gen)
            loss, sigma = self.compute_loss(x0, context, pooled, noise_gen)
            self.engine.backward(loss.mean())
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            self.window.add_losses(step_bins, loss, sigma)
            self.window.add_work(self.config.model, x0, context)
            self._count_resolution(batch.bucket)
        applied = not getattr(self.engine.optimizer, "overflow", False)
        self.window.end_step(step_bins, applied)
        if applied:
            self.ema.update()
            self.consecutive_skips = 0
        else:
            self._record_skip(keys)
        self.step += 1
        return applied

    def compute_loss(self, x0, context, pooled, generator):
        """Per-sample rectified-flow loss and sigma (B,), fp32. A seam for fault injection.

        The returned sigma is the shifted one the model saw, so the loss log's sigma bins
        describe the density actually trained on."""
        t = self.train
        # Latent side x the VAE factor = the bucket in pixels; shapes only, no device sync.
        h, w = x0.shape[-2] * SPATIAL_FACTOR, x0.shape[-1] * SPATIAL_FACTOR
        return flow.training_loss(
            self._model_fn,
            x0,
            context=context,
            pooled=pooled,
            generator=generator,
            density=t.sigma_density,
            logit_mean=t.logit_mean,
            logit_std=t.logit_std,
            mode_scale=t.mode_scale,
            weighting=t.loss_weighting,
            shift=flow.resolution_shift(t.shift, t.shift_base_resolution, h, w),
        )

    def _count_resolution(self, bucket: Bucket) -> None:
        stream = self.loader.stream
        if len(stream.resolutions) > 1:
            family = stream.families.resolution_of(bucket)
            self.window.by_resolution[stream.resolutions.index(family)] += 1

    def _record_skip(self, keys: list[list[str]]) -> None:
        self.skipped_total += 1
        self.consecutive_skips += 1
        self.skipped_keys.append({"step": self.step, "keys": keys})
        self.skipped_keys = self.skipped_keys[-self.train.max_consecutive_skips :]
        log.warning(
            "rank %d: step %d skipped: non-finite gradient norm (%d in a row, %d in total)",
            self.rank,
            self.step,
            self.consecutive_skips,
            self.skipped_total,
        )
        if self.consecutive_skips >= self.train.max_consecutive_skips:
            out = self.run_dir / "nonfinite" / f"step_{self.step:08d}_rank_{self.rank:05d}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.skipped_keys, indent=1))
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"norm (train.max_consecutive_skips={self.train.max_consecutive_skips}); the "
                f"batches' keys are in {out.parent}. Check those samples, lower train.lr, or "
                "resume from an earlier checkpoint"
            )

    def _log(self, extra: dict | None = None) -> None:
        bad = self.loader.bad_counts()
        names = ["good", *REASONS]
        bad_total = distributed.all_reduce_sum(torch.tensor([bad[n] for n in names])).tolist()
        window = self.window.summarise(self.block_timer.read_and_reset())
        per_rank, wall, samples = window["per_rank"], window["wall"], window["samples"]
        stragglers = self.stragglers.window(
            [r[0] for r in per_rank], [r[1] for r in per_rank], wall
        )
        metrics = {
            "loss": window["loss"],
            "loss_by_sigma": window["loss_by_sigma"],
            "lr": self.lr,
            "grad_norm": _as_float(self.engine.get_global_grad_norm()),
            "samples_per_s": window["samples_per_s"],
            # x axes for the report: what the eval table calls samples_seen and train_flops
            # (samples of the smallest resolution; FLOPs at this window's mean per sample).
            "samples_seen": self.step * self.global_batch,
            "train_flops": self.step
            * self.global_batch
            * self.window.flops
            * self.world
            / max(samples, 1),
            "tokens_per_s": window["tokens_per_s"],
            "tflops_per_s": window["flops_per_device"] / 1e12,
            "data_wait_frac": window["data_wait_frac"],
            "skipped_steps": self.skipped_total,
            "skipped_in_window": self.window.skipped,
            "bad_samples": dict(zip(names, (int(v) for v in bad_total), strict=True)),
            "stragglers": stragglers,
        }
        peak = self.train.peak_flops or (
            peak_bf16_flops(torch.cuda.get_device_name()) if self.device.type == "cuda" else None
        )
        if peak:
            metrics["mfu"] = mfu(window["flops_per_device"], peak)
        resolutions = self.loader.stream.resolutions
        if len(resolutions) > 1:  # the mix of bucket families in this window, all ranks
            metrics["samples"] = int(samples)
            metrics["micro_batches_by_resolution"] = dict(
                zip(map(str, resolutions), window["micro_batches_by_resolution"], strict=True)
            )
        if self.train.compile:
            metrics["compiled_graphs"] = compile_count()  # recompiles show up as growth
        self.metrics.log(self.step, {**metrics, **(extra or {})})
        self.metrics.histogram(self.step, "sigma_drawn", window["sigma_drawn"], 0.0, 1.0)
        self._reset_log_window()

    def _client_state(self) -> dict:
        return {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            "world_size": self.world,
            "global_batch": self.global_batch,
        }

    def save_checkpoint(self) -> bool:
        """Collective. True when the checkpoint was published; False (on every rank) when a
        write failed on any rank, after the failure was reported (nothing was published)."""
        self.watchdog.enter("checkpoint")
        t0 = time.perf_counter()
        try:
            path = self.checkpoints.save(
                self.engine,
                self.step,
                self.ema,
                self._client_state(),
                dumps_yaml(replace(self.config, data=self.data_config)),
            )
        except CheckpointWriteError as error:  # raised on every rank together
            # Whether a signal asked for this checkpoint decides what happens next (fit):
            # agreed here, as fit agrees, so the report says what the run will do.
            signalled = distributed.any_true(
                self.stop_flag is not None and self.stop_flag.received is not None
            )
            if self.rank == 0:
                previous = self.checkpoints.published()
                report_checkpoint_failure(
                    error,
                    run_dir=self.run_dir,
                    step=self.step,
                    max_steps=self.train.max_steps,
                    checkpoint_every=self.train.checkpoint_every,
                    on_error=self.config.faults.on_checkpoint_error,
                    previous=previous[0].path.name if previous else None,
                    seconds=time.perf_counter() - t0,
                    signalled=signalled,
                    exit_status=EXIT_STORAGE,
                )
            return False
        if self.rank == 0:
            log.info("checkpoint %s written in %.1fs", path, time.perf_counter() - t0)
        return True

    def levers(self) -> str:
        """The settings that decide speed and memory, as one log line."""
        t = self.train
        offload = [
            n for n, on in (("optimizer", t.offload_optimizer), ("params", t.offload_params)) if on
        ]
        checkpointing = t.activation_checkpointing
        if checkpointing != "none" and t.activation_checkpointing_every > 1:
            checkpointing += f" every {t.activation_checkpointing_every} blocks"
        return (
            f"{t.precision}, ZeRO-{t.zero_stage}"
            + (f" offloading {' and '.join(offload)} to CPU" if offload else "")
            + f", attention {self.config.model.attention_backend}"
            + f", activation checkpointing {checkpointing}"
            + f", torch.compile {'per block' if t.compile else 'off'}"
        )

    def _checkpoint_requested(self) -> bool:
        request = self.run_dir / CHECKPOINT_REQUEST_FILE
        mine = (self.stop_flag is not None and self.stop_flag.received is not None) or (
            self.rank == 0 and request.exists()
        )
        return distributed.any_true(mine)

    def fit(self) -> int:
        """Train to train.max_steps; EXIT_DONE, EXIT_PREEMPTED after a signal's checkpoint, or
        EXIT_STORAGE after a checkpoint that could not be written (see EXIT_STORAGE). A hang
        ends the process from the watchdog (EXIT_HUNG), and so does a failed collective whose
        peer stopped beating; any other error is raised."""
        try:
            return self._fit()
        except Exception as error:
            self.watchdog.peer_failure(error)  # exits when a peer is gone
            raise
        finally:
            self.watchdog.stop()

    def _fit(self) -> int:
        t = self.train
        if self.rank == 0:
            log.info(
                "training %s from step %d to %d: world %d x micro %d x accumulation %d = "
                "global batch %d",
                self.run_dir,
                self.step,
                t.max_steps,
                self.world,
                t.micro_batch_size,
                self.accumulation,
                self.global_batch,
            )
            log.info("levers: %s", self.levers())
        batches = iter(self.loader)
        self.last_saved = self.step if self.resume_from is not None else -1
        self.last_tried = self.last_saved
        if self.validator is not None and self.step == 0:
            self.watchdog.enter("eval")
            self.metrics.log(0, self.validator.run(self.ema) or {})  # the untrained baseline
            self._reset_log_window()
        while self.step < t.max_steps:
            self.watchdog.enter("step", self.step + 1)  # numbered as the metrics number it
            self.train_step(batches)
            val = self._validate()
            log_step = self.step % t.log_every == 0 or self.step == t.max_steps
            if val is not None or log_step:
                self._log(val)
            self._preview()
            stop_status = self._checkpoint_when_due(log_step)
            if stop_status is not None:
                self.metrics.close()
                return stop_status
        if self.last_tried != self.step and self.save_checkpoint():
            self.last_saved = self.step
        self.metrics.close()
        # A run whose last steps are in no checkpoint has not finished: its rerun redoes them.
        return EXIT_DONE if self.last_saved == self.step else EXIT_STORAGE

    def _checkpoint_when_due(self, log_step: bool) -> int | None:
        """Checkpoint at train.checkpoint_every, at the last step, and when asked (a signal or
        RUN/CHECKPOINT_NOW); the exit status when the run must stop here, else None."""
        t = self.train
        # Signals and CHECKPOINT_NOW are agreed on at log steps only: the agreement is a
        # collective whose result the host must read.
        requested = log_step and self._checkpoint_requested()
        if not (requested or self.step % t.checkpoint_every == 0 or self.step == t.max_steps):
            return None
        saved = self.save_checkpoint()  # the same answer on every rank
        self.last_tried = self.step
        if saved:
            self.last_saved = self.step
        if self.rank == 0:  # answered, even when the save failed (it was reported)
            (self.run_dir / CHECKPOINT_REQUEST_FILE).unlink(missing_ok=True)
        if not saved and self.config.faults.on_checkpoint_error == "stop":
            return EXIT_STORAGE
        if self.stop_flag is not None and distributed.any_true(self.stop_flag.received is not None):
            log.warning("rank %d: stopping at step %d on a signal", self.rank, self.step)
            # Status 3 promises a checkpoint to resume from; without one, requeueing would
            # only meet the same storage fault.
            return EXIT_PREEMPTED if saved else EXIT_STORAGE
        return None

    def _validate(self) -> dict | None:
        """The EMA's validation loss when due ({} on ranks other than 0), else None."""
        if self.validator is None or not self.validator.due(self.step):
            return None
        return self._off_the_clock(lambda: self.validator.run(self.ema) or {})

    def _preview(self) -> None:
        if self.previewer is not None and self.step % self.train.preview_every == 0:
            path = self._off_the_clock(lambda: self.previewer.render(self.ema, self.step))
            if path is not None:  # rank 0
                self.metrics.image(self.step, PREVIEW_TAG, path)

    def _off_the_clock(self, work):
        """Validation and previews: under the watchdog's eval limit, and not training time
        in the throughput window; the log-step collectives that follow are the step's."""
        self.watchdog.enter("eval")
        t0 = time.perf_counter()
        result = work()
        self.window.start += time.perf_counter() - t0
        self.watchdog.enter("step")
        return result


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)
