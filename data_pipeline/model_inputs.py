"""Loader batches -> the model's inputs (normalised latents, text context, pooled vector).

Two uses, one home below the trainer and the evaluator:

* Training (`ModelInputs`), from either source. From cache shards (SD3's way): a fresh latent
  is drawn from the stored VAE posterior every visit and CFG dropout swaps per-encoder parts of
  the stored embeddings for the stored empty prompt. From raw shards: the frozen VAE and text
  encoders run on the batch here, on the training device. All randomness comes from the
  generators the trainer passes in, which it seeds per (seed, step, micro batch), so a resumed
  or resized run draws the same noise for the same samples without carrying RNG state.
* The held-out validation loss (`held_out_inputs`): deterministic inputs, the posterior mean
  as latents and the caption never dropped, so a number depends only on the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from data_pipeline.batches import Batch, ImageBatch, LatentBatch
from data_pipeline.cache_format import CacheInfo, apply_text_dropout, load_empty_prompt
from data_pipeline.eval_samples import IndexedBatch
from mmdit.conditioning import (
    VAE,
    ConditioningConfig,
    TextEncoders,
    draw_dropout,
    load_text_encoders,
    load_vae,
)
from mmdit.val_loss import HeldOutInputs

Tensor = torch.Tensor


class ModelInputs:
    def __init__(
        self,
        conditioning: ConditioningConfig,
        *,
        text_dropout: float,
        device: torch.device,
        cache_info: CacheInfo | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.text_dropout = text_dropout
        self.device = device
        self.vae = load_vae(conditioning, device)
        self.cache_info = cache_info
        self.text = None
        if cache_info is None:
            self.text = load_text_encoders(conditioning, device)
        else:
            empty_context, empty_pooled = load_empty_prompt(cache_dir)
            self.empty_context = empty_context.to(device)
            self.empty_pooled = empty_pooled.to(device)

    def __call__(
        self, batch: Batch, noise_gen: torch.Generator, cpu_gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> latents (B, 16, h, w) fp32, context (B, L, 4096), pooled (B, 2048)."""
        match batch:
            case ImageBatch() if self.text is not None:
                return self._from_images(batch, noise_gen, cpu_gen)
            case LatentBatch() if self.cache_info is not None:
                return self._from_cache(batch, noise_gen, cpu_gen)
        source = "raw image shards" if self.cache_info is None else "cache shards"
        raise TypeError(f"a {type(batch).__name__} for model inputs set up for {source}")

    def _from_images(
        self, batch: ImageBatch, noise_gen: torch.Generator, cpu_gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        images = batch.images.to(self.device, non_blocking=True)
        latents = self.vae.encode_to_model(images, generator=noise_gen)
        text = self.text.encode(batch.captions, dropout=self.text_dropout, generator=cpu_gen)
        return latents.float(), text.context, text.pooled

    def _from_cache(
        self, batch: LatentBatch, noise_gen: torch.Generator, cpu_gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean = batch.mean.to(self.device, non_blocking=True).float()
        logvar = batch.logvar.to(self.device, non_blocking=True).float()
        latents = self.vae.to_model(self.vae.sample(mean, logvar, noise_gen))
        context = batch.context.to(self.device, non_blocking=True)
        pooled = batch.pooled.to(self.device, non_blocking=True)
        dropped = draw_dropout(len(batch), self.text_dropout, cpu_gen)
        context, pooled = apply_text_dropout(
            context,
            pooled,
            dropped,
            self.empty_context,
            self.empty_pooled,
            self.cache_info.layout,
        )
        return latents.float(), context, pooled


def held_out_inputs(
    vae: VAE, text_encoders: TextEncoders | None = None
) -> Callable[[IndexedBatch], HeldOutInputs]:
    """Deterministic model inputs for a held-out batch (data_pipeline.eval_samples.eval_batches):
    the posterior mean as latents, the caption's embeddings with no dropout. Image batches need
    the text encoders; latent batches carry their embeddings."""

    def to_inputs(held_out: IndexedBatch) -> HeldOutInputs:
        indices, batch = held_out.indices, held_out.batch
        match batch:
            case ImageBatch():
                if text_encoders is None:
                    raise ValueError("raw held-out shards need the text encoders (--components)")
                latents = vae.encode_to_model(batch.images, sample=False)
                text = text_encoders.encode(batch.captions)
                return HeldOutInputs(
                    indices, latents.float(), text.context.float(), text.pooled.float()
                )
            case LatentBatch():
                latents = vae.to_model(batch.mean.to(vae.device).float()).float()
                return HeldOutInputs(indices, latents, batch.context.float(), batch.pooled.float())
        raise TypeError(f"no model inputs for a {type(batch).__name__}")

    return to_inputs
