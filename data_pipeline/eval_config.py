"""The `eval` section of a run file: the held-out set and how the validation loss is measured
on it, and how samples are drawn for previews and metrics.

It lives below both the trainer (which validates and previews during a run) and mmdit-eval
(which reads it back from a checkpoint's run config), so neither imports the other for it."""

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
    # Sampling for FID / CLIP score, previews and mmdit-sample (SD3.5-L: 40 steps, CFG 4.5).
    sample_steps: int = 40
    cfg_scale: float = 4.5
    # The sampler's sigma shift; 0 = match the training run: train.shift, or with
    # train.shift_base_resolution SD3's sqrt(h*w)/base rule at the sampling size (a run
    # trained without a shift then samples with 1). SD3 samples 1024 px with 3.0.
    shift: float = 0.0
    fid_samples: int = 10_000
    # FID reference: shards (captions become the prompts) or an image folder; "" = val_shards.
    fid_reference: str = ""
    fid_size: int = 0  # square side of generated and reference images; 0 = data.resolution
    sample_seed: int = 0  # generated image i uses noise seeded with sample_seed + i
    # torch-fidelity's InceptionV3 weights file; "" = $TORCH_HOME/hub/checkpoints/<its name>.
    inception_weights: str = ""
    # open_clip architecture name or model-config JSON, and its local weights file; nothing
    # is downloaded. The tag applies that tag's settings (OpenAI weights need "openai").
    clip_model: str = "ViT-L-14"
    clip_checkpoint: str = ""
    clip_pretrained_tag: str = "openai"

    def __post_init__(self):
        if self.sigma_bins < 1:
            raise ValueError(f"sigma_bins={self.sigma_bins} must be >= 1")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps={self.sample_steps} must be >= 1")
        if self.shift < 0:
            raise ValueError(f"eval.shift={self.shift} must be >= 0 (0 = match train.shift)")
        if min(self.val_every, self.val_samples, self.fid_samples, self.fid_size) < 0:
            raise ValueError("val_every, val_samples, fid_samples and fid_size must be >= 0")
