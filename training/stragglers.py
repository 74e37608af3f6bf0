"""Which rank is slow: per-rank block compute and data-wait times, compared at log steps.

A rank's wall time per step says nothing: under ZeRO-3 every block starts with a parameter
all-gather, so a fast rank waits there for the slow one and all ranks take the same time. What
does differ per rank is

- **compute**: the time spent inside its own transformer blocks, from the end of ZeRO-3's
  parameter gather (our pre-hook runs after DeepSpeed's, which waits for the gather) to the end
  of the block. Waiting for peers is outside this span. On a GPU it is measured with CUDA events
  on the compute stream (a slow, throttled or busy device shows here) and read at log steps
  only, so nothing makes the host wait for the device in a step; on the CPU, wall time.
  Forward calls only (also those re-run by activation checkpointing): the backward of a block
  runs on the same device, so the forward's share is the device's speed.
- **data wait**: the time the training loop waited for its own loader (a slow file system,
  too few workers, a host busy with something else).

At each log step the per-rank pairs are gathered (one small all-gather) and the slowest rank
of each is compared with the median (the lower median, so with two ranks the slowest is
compared with the other one). A rank that is the slowest by more than `faults.straggler_factor`
for `faults.straggler_windows` log windows in a row gets one warning line naming it and its
host. Data wait only counts when it is a noticeable share of the window (DATA_WAIT_FLOOR), as
ratios of near-zero waits mean nothing.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# A rank's data wait counts as straggling only above this share of the window's wall time.
DATA_WAIT_FLOOR = 0.05


class BlockTimer:
    """Sums the time each rank spends computing in `blocks` (see the module docstring).
    Hooks are appended, so register after `deepspeed.initialize` has added its own."""

    def __init__(self, blocks, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total_s = 0.0
        self._started = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # this window's
        self._pool: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # reused pairs
        self._handles = []
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._start))
            self._handles.append(block.register_forward_hook(self._stop))

    def _start(self, _module, _args) -> None:
        if self.cuda:
            pair = (
                self._pool.pop()
                if self._pool
                else (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
            )
            pair[0].record()
            self._events.append(pair)
        else:
            self._started = time.perf_counter()

    def _stop(self, _module, _args, _output) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self.total_s += time.perf_counter() - self._started

    def read_and_reset(self) -> float:
        """Seconds of block compute since the last call (waits for the device on a GPU)."""
        if self.cuda and self._events:
            self._events[-1][1].synchronize()
            self.total_s += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._pool.extend(self._events)
            self._events = []
        total, self.total_s = self.total_s, 0.0
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class Slowest:
    """The slowest rank for one measure in one log window."""

    rank: int
    host: str
    seconds: float
    median_s: float

    @property
    def ratio(self) -> float:
        return self.seconds / self.median_s if self.median_s > 0 else 1.0

    def as_metrics(self) -> dict:
        return {
            "slowest_rank": self.rank,
            "slowest_host": self.host,
            "slowest_s": self.seconds,
            "median_s": self.median_s,
            "slowest_to_median": self.ratio,
        }


def slowest(seconds: list[float], hosts: list[str]) -> Slowest:
    worst = max(range(len(seconds)), key=lambda r: seconds[r])
    return Slowest(worst, hosts[worst], seconds[worst], statistics.median_low(seconds))


@dataclass
class StragglerReport:
    """Turns the gathered per-rank times of each log window into metrics and warnings."""

    hosts: list[str]
    factor: float  # 0 = no warnings
    windows: int
    warn: bool = True  # one rank writes the warnings (every rank has the same numbers)
    _streaks: dict[str, tuple[int, int]] = field(default_factory=dict)  # measure -> (rank, n)

    def window(self, compute_s: list[float], data_wait_s: list[float], wall_s: float) -> dict:
        """Metrics for this window: {"compute": {...}, "data_wait": {...}}; warns on a rank
        that has been the slowest by more than `factor` for `windows` windows in a row."""
        found = {
            "compute": slowest(compute_s, self.hosts),
            "data_wait": slowest(data_wait_s, self.hosts),
        }
        for measure, s in found.items():
            straggling = self.factor > 0 and s.ratio > self.factor
            if measure == "data_wait":
                straggling = straggling and s.seconds > DATA_WAIT_FLOOR * wall_s
            rank, n = self._streaks.get(measure, (-1, 0))
            n = (n + 1 if rank == s.rank else 1) if straggling else 0
            self._streaks[measure] = (s.rank, n)
            if n == self.windows and self.warn:  # once per streak, when it becomes persistent
                self._warn(measure, s, n)
        return {measure: s.as_metrics() for measure, s in found.items()}

    def _warn(self, measure: str, s: Slowest, n: int) -> None:
        what = "block compute" if measure == "compute" else "data wait"
        hint = (
            "a slow or throttled device, or a busy host: check its clocks and temperature"
            if measure == "compute"
            else "its loader is slow: file system, data.num_workers, or a busy host"
        )
        log.warning(
            "straggler: rank %d on %s has had %.2fx the median %s time (%.3f s vs %.3f s) for "
            "%d log windows in a row: %s (faults.straggler_factor=%g)",
            s.rank,
            s.host,
            s.ratio,
            what,
            s.seconds,
            s.median_s,
            n,
            hint,
            self.factor,
        )
