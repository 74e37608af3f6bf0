"""mmdit-train as real DeepSpeed ZeRO-3 jobs on the CPU (2 gloo ranks under torchrun).

One uninterrupted 2-rank run is the reference; every other run must land on its loss curve:
after kill -9, after a kill during a checkpoint write, after USR2, and on another world size.
bf16 throughout, the default precision and what every cluster run file uses (bf16 is
deterministic on the CPU), so "the same curve" means equal floats; one fp32 run checks that
bf16 tracks fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmdit.checkpoints import ema_state_dict
from tests.training.conftest import (
    CURVE_SETTINGS,
    job_args,
    read_metrics,
    run_training,
    succeeded,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8


def _args(run_dir: Path, digit_shards, tiny_components, **extra) -> list[str]:
    """`extra`: train__max_steps=6 for train.max_steps=6."""
    settings = {**CURVE_SETTINGS, "train.max_steps": STEPS, "train.checkpoint_every": 3}
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return job_args(run_dir, digit_shards, tiny_components, **settings)


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_metrics(run_dir).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digit_shards, tiny_components) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    # Previews on: the runs compared against this one have none, so equal curves also show
    # that a preview does not disturb training.
    args = _args(run_dir, digit_shards, tiny_components, train__preview_every=4)
    succeeded(run_training(2, args))
    return run_dir


def test_reference_run_trains_and_publishes_checkpoints(reference):
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    checkpoints = reference / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000008"
    published = sorted(p.name for p in checkpoints.glob("step_*"))
    assert published == ["step_00000003", "step_00000006", "step_00000008"]
    manifest = json.loads((checkpoints / "step_00000008" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == STEPS
    names = set(manifest["files"])
    assert {"client_rank_00000.json", "client_rank_00001.json", "config.yaml"} <= names
    assert any(n.startswith("ds/") for n in names)
    client = json.loads((checkpoints / "step_00000008" / "client_rank_00001.json").read_text())
    assert client["step"] == STEPS and client["loader"]["rank"] == 1
    assert set(client["rng"]) >= {"python", "numpy", "torch"}
    row = read_metrics(reference)[STEPS]
    assert row["bad_samples"]["good"] > 0 and 0.0 <= row["data_wait_frac"] <= 1.0
    assert row["samples_per_s"] > 0 and row["loss_by_sigma"]
    assert (reference / "tensorboard").is_dir()
    previews = sorted(p.name for p in (reference / "previews").iterdir())
    assert previews == ["step_00000004.png", "step_00000008.png"]
    with Image.open(reference / "previews" / "step_00000008.png") as grid:
        assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 4 prompts, 2x2, padding 2


def test_the_bf16_curve_tracks_fp32(tmp_path, reference, digit_shards, tiny_components):
    run_dir = tmp_path / "fp32"
    args = _args(run_dir, digit_shards, tiny_components, train__precision="fp32")
    succeeded(run_training(2, args))
    bf16, fp32 = _losses(reference), _losses(run_dir)
    assert sorted(fp32) == sorted(bf16)
    gaps = {s: abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32}
    # Stated tolerance: 2% per step (measured ~0.3% here); equal curves would mean the bf16
    # run did not run in bf16.
    assert max(gaps.values()) < 0.02, gaps
    assert max(gaps.values()) > 0, "bf16 and fp32 gave identical losses"


def test_kill_9_mid_run_then_the_same_command_resumes_on_the_same_curve(
    tmp_path, reference, digit_shards, tiny_components
):
    run_dir = tmp_path / "run"
    args = _args(run_dir, digit_shards, tiny_components)
    killed = run_training(2, args, instruments={"MMDIT_TEST_KILL_AFTER_STEP": "5"})
    assert killed.returncode != 0
    assert max(_losses(run_dir)) == 4  # past the step-3 checkpoint; killed before logging 5
    resumed = succeeded(run_training(2, args))
    assert "resuming from" in resumed.stderr and "step_00000003" in resumed.stderr
    assert _losses(run_dir) == _losses(reference)


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(
    tmp_path, reference, digit_shards, tiny_components
):
    run_dir = tmp_path / "run"
    args = _args(run_dir, digit_shards, tiny_components)
    killed = run_training(2, args, instruments={"MMDIT_TEST_KILL_IN_SAVE_AT": "6"})
    assert killed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".tmp_step_00000006").is_dir()  # shards written, never published
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"
    resumed = succeeded(run_training(2, args))
    assert "step_00000003" in resumed.stderr
    assert not (checkpoints / ".tmp_step_00000006").exists()
    assert _losses(run_dir) == _losses(reference)


def test_usr2_checkpoints_on_all_ranks_exits_and_the_rerun_continues_the_curve(
    tmp_path, reference, digit_shards, tiny_components
):
    run_dir = tmp_path / "run"
    args = _args(run_dir, digit_shards, tiny_components)
    stopped = run_training(2, args, instruments={"MMDIT_TEST_SIGNAL_AFTER_STEP": "4"})
    assert stopped.returncode != 0  # each rank exits 3 ("resubmit me"); torchrun reports it
    assert "stopping at step 4 on a signal" in stopped.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"  # not a periodic one
    manifest = json.loads((checkpoints / "step_00000004" / "manifest.json").read_text())
    assert {"client_rank_00000.json", "client_rank_00001.json"} <= set(manifest["files"])
    succeeded(run_training(2, args))
    assert _losses(run_dir) == _losses(reference)


def test_two_ranks_resume_on_one_with_the_same_global_batch(
    tmp_path, reference, digit_shards, tiny_components
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for later in ("step_00000006", "step_00000008"):
        shutil.rmtree(run_dir / "checkpoints" / later)
    args = _args(run_dir, digit_shards, tiny_components, train__max_steps=6)
    result = succeeded(run_training(1, args))  # one plain process: accumulation 2 keeps batch 4
    assert "universal checkpoint" in result.stderr
    expected, got = _losses(reference), _losses(run_dir)
    # Same samples, same noise, same optimizer state: the curve continues exactly (the
    # issue asks for 1e-5; (a+b)/2 == a/2 + b/2 in floating point, so it is bit-equal).
    # This also guards the repair of DeepSpeed's universal load (training.optim).
    assert {s: got[s] for s in (4, 5, 6)} == {s: expected[s] for s in (4, 5, 6)}


def test_nan_on_one_rank_skips_the_update_on_all_ranks_and_ema_matches_a_plain_ema(
    tmp_path, digit_shards, tiny_components
):
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    args = _args(run_dir, digit_shards, tiny_components, train__max_steps=5)
    instruments = {"MMDIT_TEST_NAN_AT": "2:1", "MMDIT_TEST_DUMP_DIR": str(dumps)}
    succeeded(run_training(2, args, instruments=instruments))

    def partitions(step, rank):
        return (dumps / f"partitions_{step}_rank_{rank}.txt").read_text()

    for rank in (0, 1):
        assert partitions(3, rank) == partitions(2, rank)  # step 3 (index 2) skipped
        assert partitions(2, rank) != partitions(1, rank)
        assert partitions(4, rank) != partitions(3, rank)  # training goes on
    applied = {
        s: json.loads((dumps / f"weights_{s}.json").read_text())["applied"] for s in range(1, 6)
    }
    assert applied == {1: True, 2: True, 3: False, 4: True, 5: True}
    metrics = read_metrics(run_dir)
    assert metrics[2]["skipped_steps"] == 0 and metrics[3]["skipped_steps"] == 1
    assert metrics[5]["skipped_steps"] == 1
    client = json.loads((run_dir / "checkpoints/step_00000005/client_rank_00001.json").read_text())
    assert client["skipped_total"] == 1

    # A plain EMA of the full weights, without ZeRO, step by step.
    ema = load_file(str(dumps / "weights_0.safetensors"))
    for step in range(1, 6):
        if applied[step]:
            weights = load_file(str(dumps / f"weights_{step}.safetensors"))
            ema = {n: v + (1 - 0.9) * (weights[n] - v) for n, v in ema.items()}
    sharded = ema_state_dict(run_dir / "checkpoints" / "step_00000005")
    assert sharded.keys() == ema.keys()
    for name, value in ema.items():
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-6, msg=name)
    assert any(
        not torch.equal(sharded[n], load_file(str(dumps / "weights_5.safetensors"))[n]) for n in ema
    )


def test_consecutive_non_finite_steps_abort_with_the_batch_keys(
    tmp_path, digit_shards, tiny_components
):
    run_dir = tmp_path / "run"
    args = _args(run_dir, digit_shards, tiny_components, train__max_consecutive_skips=2)
    result = run_training(1, args, instruments={"MMDIT_TEST_NAN_AT": "1+:0"})
    assert result.returncode != 0
    assert "2 consecutive steps had a non-finite loss" in result.stderr
    (written,) = (run_dir / "nonfinite").glob("*.json")
    skipped = json.loads(written.read_text())
    assert [s["step"] for s in skipped] == [1, 2]
    assert all(key.startswith("digit") for s in skipped for keys in s["keys"] for key in keys)
