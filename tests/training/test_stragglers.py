"""The straggler report: which rank is slow, by block compute and by data wait, although every
rank's step takes the same wall time under ZeRO-3. Unit tests of the rules, the timer's
exclusion of the time spent waiting for parameters, and a real 2-rank job with one rank made
slow in its blocks and the other in its data."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import torch
from torch import nn

from tests.training.conftest import REFERENCE_STDERR, REFERENCE_STEPS, read_metrics
from training.stragglers import DATA_WAIT_FLOOR, BlockTimer, StragglerReport, slowest


def test_slowest_is_compared_with_the_lower_median():
    # Two ranks: the slow one against the other (a mean would hide half the gap).
    s = slowest([1.0, 3.0], ["a", "b"])
    assert (s.rank, s.host, s.seconds, s.median_s, s.ratio) == (1, "b", 3.0, 1.0, 3.0)
    s = slowest([2.0, 1.0, 1.0, 1.2], ["a", "b", "c", "d"])
    assert (s.rank, s.median_s, s.ratio) == (0, 1.0, 2.0)
    assert slowest([0.0, 0.0], ["a", "b"]).ratio == 1.0  # nothing measured: no straggler


def test_a_rank_is_reported_once_when_it_has_been_slowest_for_the_set_number_of_windows(caplog):
    report = StragglerReport(["n0", "n1", "n2"], factor=1.3, windows=3)
    caplog.set_level(logging.WARNING, logger="training.stragglers")
    slow_1 = ([1.0, 1.5, 1.0], [0.0, 0.0, 0.0])
    metrics = report.window(*slow_1, wall_s=10)
    assert metrics["compute"] == {
        "slowest_rank": 1,
        "slowest_host": "n1",
        "slowest_s": 1.5,
        "median_s": 1.0,
        "slowest_to_median": 1.5,
    }
    report.window(*slow_1, wall_s=10)
    assert caplog.records == []  # two windows: not yet persistent
    report.window(*slow_1, wall_s=10)
    [record] = caplog.records
    assert record.getMessage().startswith(
        "straggler: rank 1 on n1 has had 1.50x the median block compute time (1.500 s vs "
        "1.000 s) for 3 log windows in a row"
    )
    report.window(*slow_1, wall_s=10)
    assert len(caplog.records) == 1  # once per streak
    # Another rank takes over: its own streak starts from one.
    slow_2 = ([1.0, 1.0, 1.4], [0.0, 0.0, 0.0])
    for _ in range(2):
        report.window(*slow_2, wall_s=10)
    assert len(caplog.records) == 1
    report.window(*slow_2, wall_s=10)
    assert "rank 2 on n2" in caplog.records[-1].getMessage()
    # Within the factor: no streak at all.
    for _ in range(5):
        report.window([1.0, 1.2, 1.0], [0.0, 0.0, 0.0], wall_s=10)
    assert len(caplog.records) == 2


def test_data_wait_counts_only_above_its_share_of_the_window(caplog):
    caplog.set_level(logging.WARNING, logger="training.stragglers")
    wall = 10.0
    tiny = DATA_WAIT_FLOOR * wall / 2  # 20x the others, but a negligible share of the window
    report = StragglerReport(["n0", "n1"], factor=1.3, windows=1)
    metrics = report.window([1.0, 1.0], [tiny / 20, tiny], wall_s=wall)
    assert metrics["data_wait"]["slowest_rank"] == 1 and caplog.records == []
    report.window([1.0, 1.0], [0.01, 2 * DATA_WAIT_FLOOR * wall], wall_s=wall)
    [record] = caplog.records
    assert "rank 1 on n1 has had" in record.getMessage() and "data wait" in record.getMessage()


def test_factor_zero_logs_the_metrics_and_never_warns(caplog):
    caplog.set_level(logging.WARNING, logger="training.stragglers")
    report = StragglerReport(["n0", "n1"], factor=0, windows=1)
    for _ in range(3):
        metrics = report.window([1.0, 9.0], [0.0, 9.0], wall_s=10)
    assert metrics["compute"]["slowest_to_median"] == 9.0 and caplog.records == []


class _Sleeps(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_the_block_timer_leaves_out_what_earlier_pre_hooks_wait_for():
    """Our hooks are registered after ZeRO-3's: the time its pre-hook waits for the gathered
    parameters (here a sleeping pre-hook) is not the block's compute."""
    blocks = [_Sleeps(0.02), _Sleeps(0.03)]
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: time.sleep(0.2))  # "waiting for peers"
    timer = BlockTimer(blocks, torch.device("cpu"))
    for block in blocks:
        block(torch.zeros(1))
    measured = timer.read_and_reset()
    assert 0.05 <= measured < 0.2, measured
    assert timer.read_and_reset() == 0.0  # read once per window
    timer.remove()
    blocks[0](torch.zeros(1))
    assert timer.read_and_reset() == 0.0


@pytest.mark.distributed
@pytest.mark.slow
def test_a_2_rank_job_names_the_slow_device_and_the_slow_loader(reference_run):
    """The shared reference job (tests/training/conftest.py): rank 1's device is slow (0.05 s
    in each of its 2 blocks' forward), rank 0 waits 0.3 s for every batch; both ranks take the
    same wall time per step. Default settings: factor 1.3, 3 windows."""
    host = socket.gethostname()
    metrics = read_metrics(reference_run)
    for step in range(1, REFERENCE_STEPS + 1):
        s = metrics[step]["stragglers"]
        assert (s["compute"]["slowest_rank"], s["compute"]["slowest_host"]) == (1, host)
        assert s["compute"]["slowest_s"] >= 0.1  # 2 blocks x 0.05 s, one micro batch
        assert s["compute"]["slowest_to_median"] > 1.3, s
        assert s["data_wait"]["slowest_rank"] == 0 and s["data_wait"]["slowest_s"] >= 0.3, s
    # One warning per slow rank, once its lead has lasted 3 log windows.
    stderr = (reference_run.parent / REFERENCE_STDERR).read_text()
    warnings = [x for x in stderr.splitlines() if "straggler: rank" in x]
    assert len(warnings) == 2, "\n".join(warnings)
    compute = next(x for x in warnings if "block compute" in x)
    data = next(x for x in warnings if "data wait" in x)
    assert f"rank 1 on {host} has had" in compute and "for 3 log windows" in compute
    assert f"rank 0 on {host} has had" in data
