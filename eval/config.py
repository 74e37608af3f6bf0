"""The `eval` section of a run file: validation loss, sampling and metric settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalConfig:
    # Held-out shards (raw or precomputed cache) for the validation loss.
    val_shards: str = ""
    val_every: int = 1000  # training steps between validation-loss evaluations; 0 = never
    val_samples: int = 512
    # SD3 scaling-study validation loss: fixed sigma grid in stratified bins, fixed noise.
    sigma_bins: int = 8
    noise_seed: int = 0
    # Sampling for FID / CLIP score (SD3.5-L defaults: 40 steps, CFG 4.5, shift 3.0).
    sample_steps: int = 40
    cfg_scale: float = 4.5
    shift: float = 3.0
    fid_samples: int = 10_000
    clip_model: str = "ViT-L-14"
    clip_checkpoint: str = ""  # local open_clip weights file; nothing is downloaded

    def __post_init__(self):
        if self.sigma_bins < 1:
            raise ValueError(f"sigma_bins={self.sigma_bins} must be >= 1")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps={self.sample_steps} must be >= 1")
        if self.val_every < 0 or self.val_samples < 0 or self.fid_samples < 0:
            raise ValueError("val_every, val_samples and fid_samples must be >= 0")
