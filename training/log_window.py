"""What one log window (the steps between two log lines) accumulates on a rank, and the
throughput and loss numbers it reduces to at the log step.

Everything a step adds stays on the device or in Python counters, so a step never waits for
the device; `summarise` is the one place that reduces across ranks and reads the result.
"""

from __future__ import annotations

import time

import torch

from mmdit import distributed
from mmdit.flops import approx_train_flops_per_sample
from mmdit.model import MMDiTConfig

# The sigmas the sampler drew, per log window: fine enough to show the logit-normal's shape.
SIGMA_HISTOGRAM_BINS = 50


class LogWindow:
    def __init__(self, sigma_bins: int, resolutions: int, device: torch.device):
        self.sigma_bins = sigma_bins
        self.resolutions = resolutions  # bucket families (data.resolutions)
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_bins = torch.zeros(2, self.sigma_bins, dtype=torch.float64, device=self.device)
        self.sigma_hist = torch.zeros(SIGMA_HISTOGRAM_BINS, device=self.device)
        self.start = time.perf_counter()
        self.steps = 0
        self.flops = 0.0
        self.tokens = 0
        self.samples = 0
        self.by_resolution = [0] * self.resolutions  # micro batches per family, this rank
        self.data_wait = 0.0
        self.skipped = 0

    # -- one step -----------------------------------------------------------------------------

    def new_step_bins(self) -> torch.Tensor:
        """(2, bins) loss sums and counts of one step: added to the window only if the update
        was applied (a skipped step's loss is not a loss the model trained on)."""
        return torch.zeros(2, self.sigma_bins, dtype=torch.float64, device=self.device)

    def add_losses(self, step_bins: torch.Tensor, loss: torch.Tensor, sigma: torch.Tensor):
        with torch.no_grad():
            idx = (sigma * self.sigma_bins).long().clamp_(0, self.sigma_bins - 1)
            step_bins[0].index_add_(0, idx, loss.detach().double())
            step_bins[1].index_add_(0, idx, torch.ones_like(loss, dtype=torch.float64))
            self.sigma_hist += torch.histc(sigma.float(), SIGMA_HISTOGRAM_BINS, 0, 1)

    def add_work(self, model: MMDiTConfig, x0: torch.Tensor, context: torch.Tensor) -> None:
        """Samples, tokens and FLOPs of a micro batch, from shapes only (no device sync)."""
        p = model.patch_size
        image_tokens = (x0.shape[-2] // p) * (x0.shape[-1] // p)
        text_tokens = context.shape[1]
        b = x0.shape[0]
        self.samples += b
        self.tokens += b * (image_tokens + text_tokens)
        self.flops += b * approx_train_flops_per_sample(model, image_tokens, text_tokens)

    def end_step(self, step_bins: torch.Tensor, applied: bool) -> None:
        if applied:
            self.loss_bins += step_bins
        else:
            self.skipped += 1
        self.steps += 1

    # -- the log step -------------------------------------------------------------------------

    def summarise(self, block_seconds: float) -> dict:
        """Collective. The window's loss (all ranks) and throughput; `per_rank` holds each
        rank's [block seconds, data wait, samples, tokens, micro batches per family...]."""
        bins = distributed.all_reduce_sum(self.loss_bins).cpu()
        wall = max(time.perf_counter() - self.start, 1e-9)
        per_rank = distributed.all_gather_rows(
            [block_seconds, self.data_wait, self.samples, self.tokens, *self.by_resolution]
        )
        sums, counts = bins[0], bins[1]
        n = counts.sum().item()
        # Summed over ranks: with several resolutions the micro batches differ in size.
        samples = sum(r[2] for r in per_rank)
        return {
            "wall": wall,
            "per_rank": per_rank,
            "samples": samples,
            "loss": (sums.sum() / n).item() if n else float("nan"),
            "loss_by_sigma": {
                f"bin{i}": (sums[i] / counts[i]).item() for i in range(len(sums)) if counts[i]
            },
            "samples_per_s": samples / wall,
            "tokens_per_s": sum(r[3] for r in per_rank) / wall,
            "flops_per_device": self.flops / wall,  # this rank = one device
            "data_wait_frac": self.data_wait / wall,
            "micro_batches_by_resolution": [
                int(sum(row[4 + i] for row in per_rank)) for i in range(self.resolutions)
            ],
            "sigma_drawn": distributed.all_reduce_sum(self.sigma_hist).tolist(),
        }
