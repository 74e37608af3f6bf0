"""The tiny SD3 VAE: written with random weights, and fitted to an image folder (``--fit-vae``).

A random VAE decodes any latent to noise, so nothing sampled through it can be recognised.
`fit_vae_to_images` trains the tiny AutoencoderKL (encoder and decoder) to reconstruct a small
image set, then sets scaling_factor/shift_factor from its latents so that the normalised
latents (z - shift) * scale the MMDiT sees are ~N(0, 1), as SD3 intends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from mmdit.testing.spec import (
    VAE_BLOCK_OUT_CHANNELS,
    VAE_LATENT_CHANNELS,
    VAE_SAMPLE_SIZE,
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
    Progress,
    seeded,
)


def write_random_vae(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKL

    n = len(VAE_BLOCK_OUT_CHANNELS)
    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=VAE_BLOCK_OUT_CHANNELS,
            layers_per_block=1,
            act_fn="silu",
            latent_channels=VAE_LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=VAE_SAMPLE_SIZE,
            scaling_factor=VAE_SCALING_FACTOR,
            shift_factor=VAE_SHIFT_FACTOR,
            force_upcast=True,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
        ).eval()
    vae.save_pretrained(str(folder), safe_serialization=True)


# ---- fitting to an image folder ------------------------------------------------------------

FIT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VAE_FIT_STEPS = 400  # 50 s at 32 px, batch 32, 1,800 images on 2 idle CPU cores
VAE_FIT_RESOLUTION = 32
VAE_FIT_BATCH_SIZE = 32
VAE_FIT_LR = 3e-3  # Adam; linear warm-up then cosine decay to 0
VAE_FIT_WARMUP = 20
# KL per latent element, relative to a per-pixel L1: enough to keep the posterior from
# collapsing to a point (the decoder then tolerates small latent errors, which is what a
# generator makes) without costing reconstruction quality.
VAE_FIT_KL_WEIGHT = 1e-3
VAE_FIT_SEED_OFFSET = 5  # its own random stream (batches and posterior samples)
_FIT_LOG_LINES = 10  # progress lines over a fit
_FIT_LOSS_WINDOW = 20  # steps averaged into the reported final loss


@dataclass(frozen=True)
class VaeFit:
    """What --fit-vae asks for: the images and the fit's few knobs."""

    images_dir: Path
    steps: int = VAE_FIT_STEPS
    resolution: int = VAE_FIT_RESOLUTION
    batch_size: int = VAE_FIT_BATCH_SIZE
    lr: float = VAE_FIT_LR
    kl_weight: float = VAE_FIT_KL_WEIGHT

    def check(self) -> None:
        """Raise ValueError (one line, naming the flag) for settings that cannot work."""
        if self.steps < 1:
            raise ValueError(f"--vae-steps {self.steps} must be >= 1")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"--vae-resolution {self.resolution} must be a multiple of 8")
        if self.batch_size < 1:
            raise ValueError(f"--vae-batch-size {self.batch_size} must be >= 1")
        if not self.images_dir.is_dir():
            raise ValueError(f"--fit-vae {self.images_dir}: no such directory")


@dataclass(frozen=True)
class VaeFitReport:
    """What a fit did and reached; goes into the component README."""

    images_dir: str
    images: int
    steps: int
    resolution: int
    batch_size: int
    lr: float
    kl_weight: float
    seconds: float
    final_l1: float  # mean L1 reconstruction loss (pixels in [-1, 1]) over the last steps
    psnr_db: float  # reconstruction PSNR of the posterior mean on the fit images
    shift_factor: float
    scaling_factor: float


def find_fit_images(images_dir: Path) -> list[Path]:
    """Image files under `images_dir`, recursively, in a fixed (sorted) order."""
    return sorted(
        p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in FIT_IMAGE_SUFFIXES
    )


def _square_rgb(path: Path, resolution: int):
    """One image as a (resolution, resolution, 3) uint8 array: RGB, transparency on white,
    centre-cropped to a square, bicubic-resized."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA", "P"):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((resolution, resolution), Image.BICUBIC), dtype=np.uint8)


def load_fit_images(images_dir: Path, resolution: int):
    """All images under `images_dir` as one (N, 3, R, R) float32 tensor in [-1, 1]."""
    import numpy as np
    import torch

    paths = find_fit_images(images_dir)
    if not paths:
        raise ValueError(
            f"--fit-vae {images_dir}: no {'/'.join(FIT_IMAGE_SUFFIXES)} images in it or below"
        )
    pixels = np.stack([_square_rgb(p, resolution) for p in paths])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _fit_lr(step: int, fit: VaeFit) -> float:
    """Linear warm-up, then cosine decay to 0: most of the gain comes at low lr at the end."""
    warmup = min(VAE_FIT_WARMUP, max(1, fit.steps // 10))
    if step < warmup:
        return fit.lr * (step + 1) / warmup
    return fit.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, fit.steps - warmup)))


def _fit_loss(vae, batch, generator, kl_weight: float):
    """(total, L1) for one batch: L1 reconstruction of a posterior sample + weighted KL."""
    posterior = vae.encode(batch).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    l1 = (recon - batch).abs().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    return l1 + kl_weight * kl, l1


def _log_fit_progress(progress: Progress, step: int, steps: int, l1: float, t0: float, bs: int):
    elapsed = time.perf_counter() - t0
    rate = (step + 1) / elapsed
    progress(
        f"  vae fit step {step + 1:>5}/{steps}  L1 {l1:.4f}  {rate * bs:6.0f} img/s  "
        f"elapsed {elapsed:5.1f} s  ETA {(steps - step - 1) / rate:5.1f} s"
    )


def train_vae(vae, images, fit: VaeFit, seed: int, progress: Progress) -> list[float]:
    """Train `vae` in place on `images` (Adam, seeded batches); returns the per-step L1."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=fit.lr)
    batch_size = min(fit.batch_size, len(images))
    order, pos, losses = torch.randperm(len(images), generator=generator), 0, []
    log_every = max(1, fit.steps // _FIT_LOG_LINES)
    vae.train().requires_grad_(True)
    t0 = time.perf_counter()
    for step in range(fit.steps):
        if pos + batch_size > len(order):  # next epoch: a fresh permutation
            order, pos = torch.randperm(len(images), generator=generator), 0
        batch = images[order[pos : pos + batch_size]]
        pos += batch_size
        for group in optimizer.param_groups:
            group["lr"] = _fit_lr(step, fit)
        loss, l1 = _fit_loss(vae, batch, generator, fit.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(l1.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"VAE fit diverged at step {step + 1} (loss {losses[-1]})")
        if (step + 1) % log_every == 0 or step + 1 == fit.steps:
            _log_fit_progress(progress, step, fit.steps, losses[-1], t0, batch_size)
    return losses


def encode_and_reconstruct(vae, images, chunk: int = 32):
    """(posterior means, reconstruction PSNR in dB) of `images` through `vae`, in chunks
    (small ones: 3x faster on CPU than 256-image chunks, which fall out of cache)."""
    import torch

    vae.eval()
    means, sq_err = [], 0.0
    with torch.inference_mode():
        for batch in images.split(chunk):
            mean = vae.encode(batch).latent_dist.mean
            recon = vae.decode(mean).sample.clamp(-1.0, 1.0)
            means.append(mean)
            sq_err += float((recon - batch).pow(2).sum())
    mse = sq_err / images.numel()
    psnr = 10.0 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak 2 in [-1, 1]
    return torch.cat(means), psnr


def latent_normalisation(means) -> tuple[float, float]:
    """(shift_factor, scaling_factor) making (z - shift) * scale zero-mean, unit-std over
    `means` (one scalar each, over all channels and positions, as SD3's are)."""
    shift = float(means.mean())
    std = float(means.std())
    if not std > 0:
        raise RuntimeError("the fitted VAE maps every image to the same latent; cannot scale")
    return round(shift, 4), round(1.0 / std, 4)


def _load_vae_for_fit(vae_dir: Path):
    """The AutoencoderKL saved in `vae_dir`, rebuilt from its config and weights.

    Not `from_pretrained`: that records the (temporary) folder as `_name_or_path`, which
    save_pretrained would then write into config.json, breaking byte-identical output."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    config = {k: v for k, v in AutoencoderKL.load_config(str(vae_dir)).items() if k[0] != "_"}
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(load_file(str(vae_dir / "diffusion_pytorch_model.safetensors")))
    return vae


def fit_vae_to_images(vae_dir: Path, fit: VaeFit, seed: int, progress: Progress) -> VaeFitReport:
    """Load the VAE in `vae_dir`, fit it to `fit.images_dir`, set its latent scale/shift and
    save it back in place (same layout, safetensors). Deterministic for the same inputs,
    seed and torch thread count."""
    fit.check()
    t0 = time.perf_counter()
    images = load_fit_images(fit.images_dir, fit.resolution)
    progress(
        f"  fitting vae on {len(images)} images from {fit.images_dir} at {fit.resolution} px: "
        f"{fit.steps} steps, batch {min(fit.batch_size, len(images))}"
    )
    vae = _load_vae_for_fit(vae_dir)
    losses = train_vae(vae, images, fit, seed, progress)
    means, psnr = encode_and_reconstruct(vae, images)
    shift, scale = latent_normalisation(means)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.eval().save_pretrained(str(vae_dir), safe_serialization=True)
    tail = losses[-_FIT_LOSS_WINDOW:]
    report = VaeFitReport(
        images_dir=str(fit.images_dir),
        images=len(images),
        steps=fit.steps,
        resolution=fit.resolution,
        batch_size=min(fit.batch_size, len(images)),
        lr=fit.lr,
        kl_weight=fit.kl_weight,
        seconds=round(time.perf_counter() - t0, 1),
        final_l1=round(sum(tail) / len(tail), 5),
        psnr_db=round(psnr, 2),
        shift_factor=shift,
        scaling_factor=scale,
    )
    progress(
        f"  vae fitted in {report.seconds:.1f} s: L1 {report.final_l1:.4f}, "
        f"PSNR {report.psnr_db:.2f} dB on the fit images, shift {shift}, scale {scale}"
    )
    return report


def fit_readme(report: VaeFitReport) -> str:
    # No timings here: the README, like the weights, is byte-identical for the same inputs.
    return f"""
## vae/ was FITTED (not random)

`--fit-vae` trained the VAE (encoder and decoder) to reconstruct {report.images} images from
`{report.images_dir}` at {report.resolution}x{report.resolution} px: {report.steps} Adam steps, \
batch {report.batch_size}, lr {report.lr} (warm-up, cosine decay), L1 loss on [-1, 1] pixels
+ {report.kl_weight} x KL per latent element.
- final L1 loss (mean of the last {_FIT_LOSS_WINDOW} steps): {report.final_l1}
- reconstruction PSNR of the posterior mean over those images: {report.psnr_db} dB
- scaling_factor {report.scaling_factor}, shift_factor {report.shift_factor} (replacing SD3's
  {VAE_SCALING_FACTOR}/{VAE_SHIFT_FACTOR}): 1/std and mean of the posterior means over the
  fit images, so the normalised latents (z - shift) * scale are ~N(0, 1) on them.
It reconstructs images like those only; anything else decodes poorly.
"""
