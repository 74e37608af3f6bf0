"""Preview grids during training: fixed prompts, fixed seed, EMA weights, on rank 0.

The prompts are encoded once at start (the text encoders are then freed, so a run that reads
cached embeddings does not keep them resident); each preview gathers the sharded EMA into a
plain MMDiT on rank 0 and samples with the eval section's steps, CFG scale and shift (eval.shift
0: the run's own training shift at the preview size, flow.matched_shift), so consecutive grids
show the same noise becoming images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmdit import flow
from mmdit.conditioning import VAE, TextEncoders, load_text_encoders
from mmdit.sampling import encode_prompts, image_grid, sample_encoded, save_png
from training.config import RunConfig
from training.ema import ShardedEMA, gather_model

log = logging.getLogger(__name__)


class Previewer:
    def __init__(
        self,
        config: RunConfig,
        vae: VAE,
        device: torch.device,
        rank: int,
        text_encoders: TextEncoders | None = None,
    ):
        """`text_encoders`: the trainer's own when it encodes on the fly (not loaded twice)."""
        self.config, self.vae, self.device, self.rank = config, vae, device, rank
        self.out_dir = Path(config.train.run_dir) / "previews"
        if rank != 0:
            return
        cond = config.conditioning
        encoders = text_encoders or load_text_encoders(cond, device)
        self.prompts = encode_prompts(encoders, config.train.preview_prompts)
        del encoders

    def render(self, ema: ShardedEMA, step: int) -> Path | None:
        """Collective (every rank calls it); rank 0 writes previews/step_XXXXXXXX.png."""
        model = gather_model(ema, self.config.model, self.device)
        if model is None:
            return None
        ev = self.config.eval
        size = self.config.data.resolution
        t = self.config.train
        shift = flow.matched_shift(ev.shift, t.shift, t.shift_base_resolution, size, size)
        images = sample_encoded(
            model,
            self.vae,
            self.prompts,
            height=size,
            width=size,
            seed=self.config.train.preview_seed,
            steps=ev.sample_steps,
            cfg_scale=ev.cfg_scale,
            shift=shift,
            device=self.device,
        )
        path = save_png(image_grid(images), self.out_dir / f"step_{step:08d}.png")
        log.info("preview %s", path)
        return path
