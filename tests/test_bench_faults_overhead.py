"""bench/faults_overhead.py at a few steps: both copies are timed, the timer's hooks ran (the
watched copy's blocks were timed) and the watchdog beat while the steps ran."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_faults", REPO / "bench" / "faults_overhead.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_faults"] = module
    spec.loader.exec_module(module)
    return module


def test_a_short_run_times_both_copies_and_writes_its_json(tmp_path):
    out = tmp_path / "overhead.json"
    argv = ["--iters", "4", "--warmup", "1", "--heartbeat-s", "0.05", "--out", str(out)]
    result = _load().main(argv)
    assert json.loads(out.read_text()) == result
    assert set(result["median_s"]) == {"plain", "watched"}
    assert all(v > 0 for v in result["median_s"].values())
    expected = result["median_s"]["watched"] / result["median_s"]["plain"] - 1
    assert abs(result["overhead_frac"] - expected) < 1e-12
    assert result["heartbeats_written"] >= 2  # the thread beat during the steps
    # The hooks timed the blocks' forward passes (warm-up steps included, which the total
    # leaves out, so no upper bound).
    assert result["watched_block_forward_s"] > 0
