"""Rectified flow: the training objective and the Euler sampler (SD3, Esser et al. 2024).

Conventions (the same as SD3 and diffusers' FlowMatchEulerDiscreteScheduler):

* sigma = 0 is data, sigma = 1 is pure noise; ``x_t = (1 - sigma) * x0 + sigma * noise``.
* The network predicts the velocity ``v = dx_t/dsigma = noise - x0``; the loss is the MSE to it.
* Sampling integrates dx/dsigma = v from sigma = 1 down to 0.

``model_fn(x, sigma, context, pooled[, context_mask=...]) -> v`` is any callable with the
signature of ``MMDiT.forward``; nothing here depends on the model, so the math can be tested
with analytic velocity fields.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping

import torch

Tensor = torch.Tensor
ModelFn = Callable[..., Tensor]

DENSITIES = ("logit_normal", "uniform", "mode")
WEIGHTINGS = ("none", "cosmap")


def _expand(sigma: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) so one sigma per sample broadcasts over all other dims."""
    return sigma.reshape(sigma.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The straight path between data and noise: x_t = (1 - sigma) x0 + sigma noise."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """d x_t / d sigma along the straight path, which does not depend on sigma."""
    return noise - x0


def sample_sigmas(
    batch: int,
    density: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shift: float = 1.0,
) -> Tensor:
    """Draw one training sigma per sample, shape (batch,), float32, on ``device``.

    The generator, when given, must live on ``device`` (torch's rule). Sampling happens on the
    device itself, so a training step never round-trips through the host. ``shift`` (a Python
    float, see `resolution_shift`) maps every draw through `shift_sigmas`; with 1.0 the draw is
    returned untouched (bit for bit, not merely equal in value).
    """
    if shift <= 0:
        raise ValueError(f"sigma shift={shift} must be > 0 (1 = no shift)")
    sigma = _draw_sigmas(batch, density, logit_mean, logit_std, mode_scale, generator, device)
    return sigma if shift == 1.0 else shift_sigmas(sigma, shift)


def _draw_sigmas(batch, density, logit_mean, logit_std, mode_scale, generator, device) -> Tensor:
    if density == "logit_normal":
        # SD3 sec. 3.1: sigmoid of a Gaussian concentrates steps on the middle of the path,
        # where the velocity is hardest to predict; m=0, s=1 was the paper's best.
        n = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(logit_mean + logit_std * n)
    u = torch.rand(batch, generator=generator, device=device)
    if density == "uniform":
        return u
    if density == "mode":
        # SD3 eq. (20), "mode sampling with heavy tails": scale 0 is uniform; for
        # -1 <= s <= 2/(pi-2) the map is monotonic and maps [0, 1] onto [0, 1].
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown sigma density {density!r}; expected one of {DENSITIES}")


def loss_weight(sigma: Tensor, weighting: str = "none") -> Tensor:
    """Per-sample loss weight, shape of ``sigma``.

    "cosmap" is SD3's cosine-mapped weighting, written as in diffusers'
    ``compute_loss_weighting_for_sd3``: 2 / (pi (1 - 2 sigma + 2 sigma^2)).
    """
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")


def shift_sigmas(sigma: Tensor | float, alpha: float) -> Tensor | float:
    """Resolution shift (SD3 eq. 23): sigma' = alpha sigma / (1 + (alpha - 1) sigma).

    More pixels carry more redundant signal, so the same sigma destroys less of the image;
    alpha > 1 moves the schedule towards the noise end to compensate. 0 and 1 are fixed points.
    """
    return alpha * sigma / (1 + (alpha - 1) * sigma)


def resolution_shift(shift: float, base_resolution: int, height: int, width: int) -> float:
    """The shift alpha for images of height x width pixels (SD3 sec. 5.3.2, eq. 23).

    ``base_resolution`` 0: the fixed ``shift``. Otherwise SD3's rule: alpha = shift *
    sqrt(m / n) with m = height * width and n = base_resolution**2, i.e. the shift grows with
    the side of the image (its token count's square root), so a 1024² bucket trained with base
    256 gets alpha = 4 * shift and a 256² bucket gets ``shift``. A Python float: it is computed
    on the host from shapes, never from a device tensor.
    """
    if base_resolution <= 0:
        return float(shift)
    return float(shift) * math.sqrt(height * width) / base_resolution


# What SD3 pipelines sample with, and what a run whose config names no shift samples with.
SD3_SAMPLING_SHIFT = 3.0


def matched_shift(
    eval_shift: float, train_shift: float, base_resolution: int, height: int, width: int
) -> float:
    """The sampling shift: ``eval_shift`` when > 0 (an explicit choice), else the training
    run's own alpha at the sampling size (`resolution_shift`), so a model samples on the same
    sigma density it was trained on."""
    if eval_shift > 0:
        return float(eval_shift)
    return resolution_shift(train_shift, base_resolution, height, width)


def sampling_shift(
    run_config: Mapping, height: int, width: int, override: float | None = None
) -> float:
    """The sampler's shift for `run_config` (a checkpoint's resolved run config; {} for
    exported weights) at height x width: `override` when given and > 0, else the run's
    eval.shift when > 0, else the run's training shift at that size (matched_shift).
    Weights without a run config sample with SD3's 3.0. Checkpoints of runs made before
    train.shift existed recorded eval.shift: 3.0, so they keep sampling as before."""
    if override:
        return float(override)
    if not run_config:
        return SD3_SAMPLING_SHIFT
    ev, train = run_config.get("eval") or {}, run_config.get("train") or {}
    return matched_shift(
        float(ev.get("shift", 0.0)),
        float(train.get("shift", 1.0)),
        int(train.get("shift_base_resolution", 0)),
        height,
        width,
    )


# The sampler grid follows diffusers' FlowMatchEulerDiscreteScheduler, which SD3 pipelines use.
TRAIN_TIMESTEPS = 1000


def sampling_sigmas(
    steps: int, shift: float = 3.0, device: torch.device | str | None = None
) -> Tensor:
    """The sampler's grid: steps + 1 sigmas from exactly 1 down to exactly 0.

    The schedule of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` (what
    ``StableDiffusion3Pipeline`` samples with), so a checkpoint sampled here and through an
    exported diffusers pipeline walks the same sigmas: ``steps`` points evenly spaced from 1 to
    the scheduler's smallest training sigma (itself already shifted: shift(1/1000)), shifted
    (again), then a final 0.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sigma_min = shift_sigmas(1.0 / TRAIN_TIMESTEPS, shift)
    grid = shift_sigmas(torch.linspace(1.0, sigma_min, steps, dtype=torch.float64), shift)
    grid = torch.cat([grid, grid.new_zeros(1)])
    grid[0] = 1.0  # pin the start against rounding
    return grid.to(device=device, dtype=torch.float32)


def _call(model_fn: ModelFn, x, sigma, context, pooled, context_mask):
    # Only pass the mask when there is one, so plain 4-argument functions work too.
    if context_mask is None:
        return model_fn(x, sigma, context, pooled)
    return model_fn(x, sigma, context, pooled, context_mask=context_mask)


def training_loss(
    model_fn: ModelFn,
    x0: Tensor,
    *,
    context: Tensor,
    pooled: Tensor,
    context_mask: Tensor | None = None,
    sigma: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    density: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    weighting: str = "none",
    shift: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Rectified-flow loss. Returns ``(loss, sigma)``, both (B,) float32 tensors.

    The loss is not reduced: the trainer takes the mean for the gradient and bins the
    per-sample values by sigma for logging. No host synchronisation happens here.
    ``sigma`` and ``noise`` may be given (tests, stratified validation); otherwise they are
    drawn with ``generator`` (which must live on x0's device) and moved by ``shift`` (see
    `sample_sigmas`); a given ``sigma`` is used as it is.
    """
    b = x0.shape[0]
    if sigma is None:
        sigma = sample_sigmas(
            b,
            density,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
            generator=generator,
            device=x0.device,
            shift=shift,
        )
    sigma = sigma.to(device=x0.device, dtype=torch.float32)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = interpolate(x0, noise, sigma)
    v = _call(model_fn, x_t, sigma, context, pooled, context_mask)
    # The squared error is formed in fp32 even when the model runs in bf16.
    err = (v.float() - velocity_target(x0, noise).float()) ** 2
    loss = err.reshape(b, -1).mean(dim=1) * loss_weight(sigma, weighting)
    return loss, sigma


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    noise: Tensor,
    *,
    context: Tensor,
    pooled: Tensor,
    neg_context: Tensor | None = None,
    neg_pooled: Tensor | None = None,
    steps: int = 28,
    cfg_scale: float = 4.5,
    shift: float = 3.0,
    context_mask: Tensor | None = None,
    neg_context_mask: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Integrate the flow ODE from sigma=1 (``noise``) to sigma=0 with Euler steps.

    Classifier-free guidance: v = v_u + s (v_c - v_u), with the conditional and unconditional
    halves evaluated in one batched call [cond; uncond]. With ``cfg_scale == 1`` or no negative
    conditioning the guidance is the identity, so only the conditional call is made.
    """
    guided = neg_context is not None and cfg_scale != 1.0
    if guided:
        if neg_pooled is None:
            raise ValueError("neg_context needs neg_pooled")
        context = torch.cat([context, neg_context])
        pooled = torch.cat([pooled, neg_pooled])
        if context_mask is not None or neg_context_mask is not None:
            # A missing mask means "every token is real".
            if context_mask is None:
                context_mask = torch.ones_like(neg_context_mask)
            if neg_context_mask is None:
                neg_context_mask = torch.ones_like(context_mask)
            context_mask = torch.cat([context_mask, neg_context_mask])

    b = noise.shape[0]
    # The grid lives on the host: reading python floats from it never waits for the device.
    grid = sampling_sigmas(steps, shift).tolist()
    x = noise
    for i in range(steps):
        s, s_next = grid[i], grid[i + 1]
        if progress:
            print(f"euler step {i + 1}/{steps} sigma={s:.4f}", file=sys.stderr, flush=True)
        x_in = torch.cat([x, x]) if guided else x
        sigma = torch.full((x_in.shape[0],), s, device=x.device, dtype=torch.float32)
        v = _call(model_fn, x_in, sigma, context, pooled, context_mask).to(x.dtype)
        if guided:
            v_c, v_u = v[:b], v[b:]
            v = v_u + cfg_scale * (v_c - v_u)
        x = x + (s_next - s) * v  # s_next < s: a step towards the data
    return x
