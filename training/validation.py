"""Validation loss during training, logged with the training metrics.

Every `eval.val_every` steps, and at step 0 of a fresh run, the sharded EMA is gathered into a
plain MMDiT on rank 0, which computes the SD3-style validation loss of
data_pipeline.held_out_loss (fixed sigma bins, fixed noise, posterior-mean latents) on the
first `eval.val_samples` samples of `eval.val_shards`; the other ranks wait. It is the number
`mmdit-eval --weights ema` gives for the checkpoint of the same step, so the curve in
metrics.jsonl and the eval table agree.
Rank 0 evaluates alone because a full copy of the weights on every rank would cost each of
them the memory ZeRO-3 saves; on GPUs a few hundred samples take seconds.
"""

from __future__ import annotations

import logging
import time

import torch

from data_pipeline.eval_samples import shard_mode
from data_pipeline.held_out_loss import held_out_loss
from data_pipeline.model_inputs import ModelInputs
from mmdit import distributed
from mmdit.conditioning import load_text_encoders
from training.config import RunConfig
from training.ema import ShardedEMA, gather_model

log = logging.getLogger(__name__)


class Validator:
    def __init__(self, config: RunConfig, inputs: ModelInputs, device: torch.device, rank: int):
        self.config, self.device, self.rank = config, device, rank
        ev = config.eval
        self.every = ev.val_every
        self.vae = inputs.vae
        self.text = inputs.text
        if rank == 0 and self.text is None and shard_mode(ev.val_shards) == "images":
            # Training reads cached embeddings but the held-out shards are raw images.
            self.text = load_text_encoders(config.conditioning, device)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def run(self, ema: ShardedEMA) -> dict | None:
        """Collective (every rank calls it): the val metrics on rank 0, None elsewhere."""
        model = gather_model(ema, self.config.model, self.device)
        metrics = None
        if model is not None:
            start = time.perf_counter()
            ev = self.config.eval
            # bf16 on GPUs for bf16 runs, as mmdit-eval does; the CPU evaluates in fp32.
            bf16 = self.device.type == "cuda" and self.config.train.precision == "bf16"
            dtype = torch.bfloat16 if bf16 else torch.float32
            model = model.to(dtype)
            result = held_out_loss(
                model,
                self.config.data,
                ev.val_shards,
                self.vae,
                self.text,
                samples=ev.val_samples,
                bins=ev.sigma_bins,
                noise_seed=ev.noise_seed,
                batch_size=self.config.train.micro_batch_size,
                device=self.device,
                dtype=dtype,
            )
            metrics = {
                "val_loss": result.mean,
                "val_loss_by_sigma": {f"bin{k}": v for k, v in enumerate(result.per_bin)},
                "val_samples": result.samples,
            }
            log.info(
                "val_loss %.5f on %d samples (EMA, %.1f s)",
                result.mean,
                result.samples,
                time.perf_counter() - start,
            )
        distributed.barrier()
        return metrics
