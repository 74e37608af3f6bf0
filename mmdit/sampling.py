"""Text-to-image generation: noise -> Euler flow sampling -> VAE decode -> images.

Shared by the trainer's preview grids and eval's `mmdit-sample`, so both draw the same images
for the same (prompt, seed). Sample i of a call uses its own CPU generator seeded with
``seed + i``: the noise does not depend on the device, the batch size or the chunking, so a
batch of N gives the same images as N calls of one (up to float rounding in batched matmuls).

The one path from prompts to images: ``encode_prompts`` (the prompts, and the negative prompt
for classifier-free guidance once) -> ``sample_encoded`` -> images. ``sample_prompts`` does both a
batch at a time, for prompt lists too long to hold all embeddings at once (eval's FID set);
``mmdit-sample`` and the trainer's previews encode up front and free the text encoders before
sampling.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from mmdit.atomic_file import write_atomic
from mmdit.flow import euler_sample

if TYPE_CHECKING:
    from mmdit.conditioning import TextEmbeddings, TextEncoders

Tensor = torch.Tensor

# VAE downsampling (8) times the MMDiT patch size (2): pixel sides must divide by this.
SIZE_MULTIPLE = 16
VAE_FACTOR = 8


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, int) and value >= SIZE_MULTIPLE and value % SIZE_MULTIPLE == 0:
            continue
        hint = ""
        if isinstance(value, (int, float)):
            nearest = max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            hint = f"; e.g. {name}={nearest}"
        raise ValueError(
            f"{name}={value!r} must be a positive int multiple of {SIZE_MULTIPLE} pixels "
            f"(VAE factor {VAE_FACTOR} x patch size 2){hint}"
        )


def _batch_of(name: str, tensor: Tensor | None, batch: int, *, broadcast: bool) -> Tensor | None:
    """Check a conditioning tensor's batch size; a batch of 1 broadcasts when allowed (one
    negative prompt for every sample)."""
    if tensor is None:
        return None
    if broadcast and tensor.shape[0] == 1 and batch != 1:
        return tensor.expand(batch, *tensor.shape[1:])
    if tensor.shape[0] != batch:
        allowed = f"{batch}" + (" or 1" if broadcast else "")
        raise ValueError(
            f"{name} has batch size {tensor.shape[0]} but context has {batch}; "
            f"give {allowed} rows (one per prompt)"
        )
    return tensor


def initial_noise(
    batch: int, channels: int, height: int, width: int, seed: int, first_index: int = 0
) -> Tensor:
    """(batch, channels, height/8, width/8) float32 noise on the CPU; sample i is drawn from
    its own generator seeded with seed + first_index + i."""
    shape = (channels, height // VAE_FACTOR, width // VAE_FACTOR)
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed + first_index + i))
            for i in range(batch)
        ]
    )


def _default_device(model_fn: Callable, context: Tensor) -> torch.device:
    if isinstance(model_fn, torch.nn.Module):
        for p in model_fn.parameters():
            return p.device
    return context.device


@torch.no_grad()
def generate(
    model_fn: Callable[..., Tensor],
    vae,
    context: Tensor,
    pooled: Tensor,
    *,
    neg_context: Tensor | None = None,
    neg_pooled: Tensor | None = None,
    height: int,
    width: int,
    seed: int,
    steps: int = 28,
    cfg_scale: float = 4.5,
    shift: float = 3.0,
    latent_channels: int = 16,
    batch_size: int = 8,
    context_mask: Tensor | None = None,
    neg_context_mask: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Generate one image per row of ``context`` / ``pooled``.

    ``model_fn(latents, sigma, context, pooled) -> velocity`` (e.g. an ``MMDiT`` in eval mode)
    is evaluated in ``dtype`` on ``device`` (default: the model's device, else the context's);
    the Euler integration itself stays in fp32 so low-precision models do not accumulate
    rounding over the steps. ``vae`` is an ``mmdit.conditioning.VAE``. Negative conditioning
    may have batch 1 (shared) or the batch of ``context``; without it, or with
    ``cfg_scale == 1``, sampling is unguided. Samples are processed ``batch_size`` at a time.

    Returns (B, 3, height, width) float32 images in [-1, 1] on the CPU.
    """
    _check_size(height, width)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if context.ndim != 3 or pooled.ndim != 2:
        raise ValueError(
            f"context must be (B, L, D) and pooled (B, P), got {tuple(context.shape)} and "
            f"{tuple(pooled.shape)}; encode prompts with TextEncoders.encode"
        )
    B = context.shape[0]
    pooled = _batch_of("pooled", pooled, B, broadcast=False)
    context_mask = _batch_of("context_mask", context_mask, B, broadcast=False)
    if (neg_context is None) != (neg_pooled is None):
        raise ValueError("give neg_context and neg_pooled together (both from one encode call)")
    neg_context = _batch_of("neg_context", neg_context, B, broadcast=True)
    neg_pooled = _batch_of("neg_pooled", neg_pooled, B, broadcast=True)
    neg_context_mask = _batch_of("neg_context_mask", neg_context_mask, B, broadcast=True)
    device = torch.device(device) if device is not None else _default_device(model_fn, context)

    def model_in_dtype(x, sigma, ctx, pool, **kw):
        return model_fn(x.to(dtype), sigma, ctx, pool, **kw).float()

    def to_device(t: Tensor | None, cast: bool = True) -> Tensor | None:
        if t is None:
            return None
        return t.to(device, dtype) if cast else t.to(device)

    images = []
    for start in range(0, B, batch_size):
        rows = slice(start, min(start + batch_size, B))
        n = rows.stop - rows.start
        noise = initial_noise(n, latent_channels, height, width, seed, first_index=start)
        latents = euler_sample(
            model_in_dtype,
            noise.to(device),
            context=to_device(context[rows]),
            pooled=to_device(pooled[rows]),
            neg_context=to_device(None if neg_context is None else neg_context[rows]),
            neg_pooled=to_device(None if neg_pooled is None else neg_pooled[rows]),
            context_mask=to_device(
                None if context_mask is None else context_mask[rows], cast=False
            ),
            neg_context_mask=to_device(
                None if neg_context_mask is None else neg_context_mask[rows], cast=False
            ),
            steps=steps,
            cfg_scale=cfg_scale,
            shift=shift,
        )
        # VAE.decode applies from_model (the latent shift/scale) itself, exactly once.
        images.append(vae.decode(latents).float().cpu())
    return torch.cat(images)


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts as the sampler takes them: one embedding row per prompt, and the negative
    prompt's single row, shared by every sample as CFG's unconditional branch."""

    text: TextEmbeddings
    negative: TextEmbeddings

    def __len__(self) -> int:
        return self.text.context.shape[0]


def encode_prompts(
    text_encoders: TextEncoders, prompts: Sequence[str], negative_prompt: str = ""
) -> EncodedPrompts:
    """Encode ``prompts`` and, once, ``negative_prompt`` (default the empty prompt)."""
    return EncodedPrompts(
        text_encoders.encode(list(prompts)), text_encoders.encode([negative_prompt])
    )


def sample_encoded(
    model_fn: Callable[..., Tensor],
    vae,
    prompts: EncodedPrompts,
    *,
    height: int,
    width: int,
    seed: int,
    steps: int = 28,
    cfg_scale: float = 4.5,
    shift: float = 3.0,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """One image per encoded prompt, prompt i from noise seed ``seed + i`` (see ``generate``,
    which receives the embeddings in fp32). Returns (N, 3, height, width) float32 in [-1, 1]."""
    return generate(
        model_fn,
        vae,
        prompts.text.context.float(),
        prompts.text.pooled.float(),
        neg_context=prompts.negative.context.float(),
        neg_pooled=prompts.negative.pooled.float(),
        height=height,
        width=width,
        seed=seed,
        steps=steps,
        cfg_scale=cfg_scale,
        shift=shift,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )


def sample_prompts(
    model_fn: Callable[..., Tensor],
    vae,
    text_encoders: TextEncoders,
    prompts: Sequence[str],
    *,
    height: int,
    width: int,
    seed: int,
    steps: int = 28,
    cfg_scale: float = 4.5,
    shift: float = 3.0,
    negative_prompt: str = "",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Prompts -> (N, height, width, 3) uint8 images, prompt i from noise seed ``seed + i``.

    Encodes ``batch_size`` prompts at a time (the negative prompt once), so a long list never
    holds more than one batch of embeddings; ``on_batch(done)`` is called after each batch
    with the number of images made so far (progress reports)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    negative = text_encoders.encode([negative_prompt])
    pixels = []
    for lo in range(0, len(prompts), batch_size):
        hi = min(lo + batch_size, len(prompts))
        batch = EncodedPrompts(text_encoders.encode(list(prompts[lo:hi])), negative)
        images = sample_encoded(
            model_fn,
            vae,
            batch,
            height=height,
            width=width,
            seed=seed + lo,
            steps=steps,
            cfg_scale=cfg_scale,
            shift=shift,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
        )
        pixels.append(to_uint8(images))
        if on_batch is not None:
            on_batch(hi)
    if not pixels:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.concatenate(pixels)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """Tile (N, 3, H, W) images in [-1, 1] into one RGB image, ``nrow`` images per row
    (default ceil(sqrt(N))), with ``padding`` black pixels around and between them (the
    layout of torchvision's make_grid)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be (N, 3, H, W) with N >= 1, got {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding={padding} must be >= 0")
    N, _, H, W = images.shape
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(N))
    if ncol < 1:
        raise ValueError(f"nrow={nrow} must be >= 1")
    ncol = min(ncol, N)
    nrows = math.ceil(N / ncol)
    grid = np.zeros(
        (nrows * (H + padding) + padding, ncol * (W + padding) + padding, 3), dtype=np.uint8
    )
    for i, pixels in enumerate(to_uint8(images)):
        top = padding + (i // ncol) * (H + padding)
        left = padding + (i % ncol) * (W + padding)
        grid[top : top + H, left : left + W] = pixels
    return Image.fromarray(grid)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as PNG to ``path`` atomically (creating parent directories), so a
    viewer polling the file never sees half an image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_atomic(path, buf.getvalue())
