"""Two resolutions and the train-time shift in one real 2-rank ZeRO-3 run (gloo, CPU).

Half the digits are drawn at 32 px and half at 48 px; with data.resolutions [32, 48] they form
two bucket families, micro batches of 2 (32 px) and 1 (48 px, 2 x (32/48)**2 rounded down).
train.shift 3 with base 32 gives alpha 3 at 32 px and 4.5 at 48 px. One uninterrupted run is
the reference; the same command killed after step 4 and rerun lands on its losses exactly.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from data_pipeline.testing.demo_set import DIGIT_WORDS, render_digit
from mmdit import flow
from tests.training.conftest import losses, read_metrics, run_training, train_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
ALPHA = {4: 3.0, 6: 3.0 * math.sqrt(48 * 48) / 32}  # latent side -> alpha (32 px, 48 px)
MICRO = {4: 2, 6: 1}  # latent side -> micro batch


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """4 shards x 16 digits, every other one drawn at 48 px instead of 32."""
    from sklearn.datasets import load_digits

    from tests.data_pipeline.conftest import make_tar

    digits = load_digits()
    root = tmp_path_factory.mktemp("mixed_digits")
    for s in range(4):
        members = []
        for i in range(s * 16, (s + 1) * 16):
            size = 48 if i % 2 else 32
            buf = io.BytesIO()
            render_digit(digits.images[i], size).save(buf, format="PNG")
            key = f"digit{i:05d}"
            caption = f"a handwritten digit {DIGIT_WORDS[int(digits.target[i])]}"
            members += [(f"{key}.png", buf.getvalue()), (f"{key}.txt", caption.encode())]
        (root / f"{s:06d}.tar").write_bytes(make_tar(members))
    return root


def _args(run_dir: Path, shards: Path, components: Path) -> list[str]:
    extra = {
        "data.resolutions": "[32, 48]",
        "train.shift": 3.0,
        "train.shift_base_resolution": 32,
        "train.max_steps": STEPS,
        "train.checkpoint_every": 3,
        "train.global_batch_size": 8,  # micro 2 x 2 ranks x accumulation 2
        "train.precision": "bf16",
    }
    overrides = train_overrides(run_dir, shards, components, **extra)
    return ["--config", "configs/debug_cpu.yaml", *overrides]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mixed_shards, tiny_components) -> Path:
    run_dir = tmp_path_factory.mktemp("multires") / "run"
    dump = run_dir.parent / "sigmas"
    result = run_training(
        2,
        _args(run_dir, mixed_shards, tiny_components),
        instruments={"MMDIT_TEST_SIGMA_DUMP": str(dump)},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_both_families_train_with_their_micro_batch_and_shift(reference):
    rows = []
    for rank in (0, 1):
        lines = (reference.parent / "sigmas" / f"sigmas_rank_{rank}.jsonl").read_text()
        rows += [json.loads(line) for line in lines.splitlines()]
    assert len(rows) == STEPS * 2 * 2  # steps x ranks x accumulation
    seen = set()
    for row in rows:
        side = row["shape"][-1]
        assert row["shape"][-2] == side and side in ALPHA, row["shape"]
        seen.add(side)
        assert row["shape"][0] == MICRO[side]
        sigma, unshifted = torch.tensor(row["sigma"]), torch.tensor(row["unshifted"])
        # Exactly SD3's shift of the draw the run would have made without it.
        expected = flow.shift_sigmas(unshifted, ALPHA[side])
        torch.testing.assert_close(sigma, expected, rtol=0, atol=1e-6)
        assert bool((sigma > unshifted).all())
    assert seen == {4, 6}, "both bucket families must have trained"
    metrics = read_metrics(reference)
    by_res = [m["micro_batches_by_resolution"] for m in metrics.values()]
    mix = {r: sum(m[r] for m in by_res) for r in ("32", "48")}
    assert mix["32"] + mix["48"] == STEPS * 4 and min(mix.values()) > 0, mix
    # Samples per step follow the mix: 2 per 32 px micro batch, 1 per 48 px one.
    assert sum(m["samples"] for m in metrics.values()) == 2 * mix["32"] + mix["48"]
    assert {m["samples"] for m in metrics.values()} != {8}


def test_kill_9_then_rerun_continues_the_multi_resolution_curve_exactly(
    tmp_path, reference, mixed_shards, tiny_components
):
    run_dir = tmp_path / "run"
    args = _args(run_dir, mixed_shards, tiny_components)
    killed = run_training(2, args, instruments={"MMDIT_TEST_KILL_AFTER_STEP": "4"}, timeout=900)
    assert killed.returncode != 0
    assert max(losses(run_dir)) == 3 or max(losses(run_dir)) == 4
    resumed = run_training(2, args, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step_00000003" in resumed.stderr
    assert losses(run_dir) == losses(reference)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
