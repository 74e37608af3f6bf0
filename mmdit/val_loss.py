"""Validation loss as in the SD3 scaling study: comparable across checkpoints, sizes and clusters.

The training loss is noisy twice over: sigma is drawn at random and so is the noise. Here both
are fixed. Every held-out sample is evaluated at the same K sigmas, the centres of K equal bins
of [0, 1] (sigma_k = (k + 0.5) / K, "stratified"), with noise drawn from a generator seeded by
(noise_seed, the sample's position in the ordered held-out pass, k), on the CPU. Latents are the
VAE posterior *mean* (not a draw) and the caption is never dropped
(data_pipeline.model_inputs.held_out_inputs). So a number depends only on
the weights, the held-out set and (K, noise_seed): the same on 1 or 64 ranks, on CPU or GPU up
to float rounding, and comparable between model sizes.

Reported: the loss per bin (the mean over samples of the per-sample MSE to the velocity) and
their mean (each bin weighted equally, i.e. the loss under uniform sigma).

The grid is never shifted by train.shift: the number measures the velocity error over the whole
path with equal weight, so runs and stages trained with different shifts (or none) stay
comparable on one scale. The trainer's own `loss_by_sigma` bins, by contrast, are of the
shifted sigmas the model was trained on, so they show where the training density puts its mass.

Here is the math on model inputs; data_pipeline.held_out_loss runs it over the held-out shards
and merges the ranks' shares, for the trainer's validation and mmdit-eval alike.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from mmdit import flow

log = logging.getLogger(__name__)

Tensor = torch.Tensor


class HeldOutInputs(NamedTuple):
    """One held-out batch as the model takes it, with each sample's position in the ordered
    held-out pass (the position seeds the sample's fixed noise)."""

    indices: list[int]
    latents: Tensor  # (B, 16, h, w), normalised
    context: Tensor  # (B, L, 4096)
    pooled: Tensor  # (B, 2048)


@dataclass(frozen=True)
class ValLoss:
    mean: float
    per_bin: list[float]
    sigmas: list[float]
    samples: int
    noise_seed: int
    bad_samples: dict[str, int] = field(default_factory=dict)

    def as_row(self) -> dict[str, float | int]:
        row: dict[str, float | int] = {"val_loss": self.mean, "val_samples": self.samples}
        row.update({f"val_loss_bin_{k}": v for k, v in enumerate(self.per_bin)})
        return row


def bin_sigmas(bins: int) -> Tensor:
    """The K stratified sigmas: the centres of K equal bins of [0, 1], float64."""
    if bins < 1:
        raise ValueError(f"sigma bins={bins} must be >= 1")
    return (torch.arange(bins, dtype=torch.float64) + 0.5) / bins


def noise_seed_for(noise_seed: int, index: int, k: int) -> int:
    """A 63-bit generator seed for (run seed, sample position, bin): independent streams
    without arithmetic collisions between neighbouring seeds."""
    digest = hashlib.blake2b(f"val:{noise_seed}:{index}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fixed_noise(shape: tuple[int, ...], noise_seed: int, index: int, k: int) -> Tensor:
    gen = torch.Generator().manual_seed(noise_seed_for(noise_seed, index, k))
    return torch.randn(shape, generator=gen)


@torch.no_grad()
def per_sample_losses(
    model_fn: Callable[..., Tensor],
    batches: Iterable[HeldOutInputs],
    *,
    bins: int,
    noise_seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[int, list[float]]:
    """{sample position: [loss at sigma_0, ..., sigma_K-1]} for this rank's batches."""
    sigmas = bin_sigmas(bins).float().tolist()
    out: dict[int, list[float]] = {}
    done, start = 0, time.monotonic()
    for n_batches, batch in enumerate(batches, start=1):
        x0 = batch.latents.to(device, torch.float32)
        context = batch.context.to(device, dtype)
        pooled = batch.pooled.to(device, dtype)
        indices = batch.indices
        losses = []
        for k, s in enumerate(sigmas):
            noise = torch.stack(
                [fixed_noise(tuple(x0.shape[1:]), noise_seed, i, k) for i in indices]
            )
            loss, _ = flow.training_loss(
                lambda x, sig, c, p: model_fn(x.to(dtype), sig, c, p),
                x0,
                context=context,
                pooled=pooled,
                sigma=torch.full((len(indices),), s),
                noise=noise.to(device),
            )
            losses.append(loss.double().cpu())
        per_sample = torch.stack(losses, dim=1)  # (B, K)
        out.update({i: row.tolist() for i, row in zip(indices, per_sample, strict=True)})
        done += len(indices)
        if n_batches % 10 == 0:
            _progress(done, start)
    _progress(done, start)
    return out


def _progress(done: int, start: float) -> None:
    rate = done / max(time.monotonic() - start, 1e-9)
    log.info("val loss: %d samples on this rank (%.1f samples/s)", done, rate)


def reduce_losses(
    losses: dict[int, list[float]], *, bins: int, noise_seed: int, bad: dict | None = None
) -> ValLoss:
    """Per-bin means over all samples, summed in sample order (so the result does not depend
    on how samples were split over ranks)."""
    if not losses:
        raise ValueError(
            "no validation samples were evaluated: the held-out shards are empty or every "
            "sample was bad (see bad_samples)"
        )
    table = torch.tensor([losses[i] for i in sorted(losses)], dtype=torch.float64)  # (N, K)
    if table.shape[1] != bins:
        raise ValueError(f"losses have {table.shape[1]} bins, expected {bins}")
    per_bin = table.mean(dim=0)
    return ValLoss(
        mean=float(per_bin.mean()),
        per_bin=[float(v) for v in per_bin],
        sigmas=[float(v) for v in bin_sigmas(bins)],
        samples=table.shape[0],
        noise_seed=noise_seed,
        bad_samples=dict(bad or {}),
    )
