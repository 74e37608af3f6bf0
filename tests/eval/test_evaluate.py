"""mmdit-eval and mmdit-sample on a real (tiny) training run: checkpoints written by mmdit-train
under DeepSpeed, read back as EMA and raw weights, and as exported files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.batches import collate
from data_pipeline.config import DataConfig
from data_pipeline.eval_samples import IndexedBatch, eval_items
from eval.evaluate import main as eval_main
from eval.sample import main as sample_main
from mmdit import val_loss
from tests.training.conftest import REPO, read_metrics, run_training, train_overrides

pytestmark = pytest.mark.slow

VAL = ["--val-samples", "24", "--sigma-bins", "4", "--batch-size", "5"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digit_shards, tiny_components):
    """4 steps of the tiny model, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("eval_run") / "run"
    settings = {
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.precision": "fp32",
        "train.lr": "1e-3",
        "eval.val_shards": f"{digit_shards}/{{000006..000007}}.tar",
        "eval.val_every": 2,
        "eval.val_samples": 24,
        "eval.sigma_bins": 4,
    }
    args = [
        "--config",
        "configs/debug_cpu.yaml",
        *train_overrides(run_dir, digit_shards, tiny_components, **settings),
    ]
    result = run_training(1, args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "table.json").read_text())


def test_val_loss_table_has_every_checkpoint_and_weights(trained_run, tiny_components, tmp_path):
    out = tmp_path / "eval"
    args = ["--checkpoints", str(trained_run), "--weights", "ema,raw", "--out", str(out)]
    assert eval_main([*args, "--components", str(tiny_components), *VAL]) == 0
    rows = _rows(out)
    assert [(r["step"], r["weights"]) for r in rows] == [
        (2, "ema"),
        (2, "raw"),
        (4, "ema"),
        (4, "raw"),
    ]
    for row in rows:
        assert row["val_samples"] == 24 and row["model"] == "d2" and row["params"] > 0
        bins = [row[f"val_loss_bin_{k}"] for k in range(4)]
        assert row["val_loss"] == pytest.approx(np.mean(bins), rel=1e-12)
        assert row["samples_seen"] == row["step"] * 2  # micro batch 2, one rank
        assert row["train_flops"] > 0
    assert rows[2]["train_flops"] == pytest.approx(2 * rows[0]["train_flops"])
    header = (out / "table.csv").read_text().splitlines()[0].split(",")
    assert {"run", "model", "params", "step", "train_flops", "weights", "val_loss"} <= set(header)


def test_trainer_logs_the_val_loss_mmdit_eval_computes(trained_run, tiny_components, tmp_path):
    metrics = read_metrics(trained_run)
    assert sorted(s for s, row in metrics.items() if "val_loss" in row) == [0, 2, 4]
    assert set(metrics[2]["val_loss_by_sigma"]) == {"bin0", "bin1", "bin2", "bin3"}
    out = tmp_path / "eval"
    args = ["--checkpoints", str(trained_run), "--components", str(tiny_components), *VAL]
    assert eval_main([*args, "--out", str(out)]) == 0
    for row in _rows(out):
        assert row["val_loss"] == pytest.approx(metrics[row["step"]]["val_loss"], rel=1e-6)


def test_val_loss_is_deterministic_across_runs_and_world_sizes(
    trained_run, tiny_components, tmp_path
):
    common = ["--checkpoints", f"{trained_run}:4", "--components", str(tiny_components), *VAL]
    assert eval_main([*common, "--out", str(tmp_path / "a")]) == 0
    assert eval_main([*common, "--out", str(tmp_path / "b")]) == 0
    a, b = _rows(tmp_path / "a")[0], _rows(tmp_path / "b")[0]
    assert a["val_loss"] == b["val_loss"]
    # Two gloo ranks through torchrun: each takes every other sample, the results are merged.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--standalone", "-m", "eval.evaluate", *common, "--out", str(tmp_path / "c"),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    c = _rows(tmp_path / "c")[0]
    assert c["val_samples"] == a["val_samples"] == 24
    for k in range(4):
        assert c[f"val_loss_bin_{k}"] == pytest.approx(a[f"val_loss_bin_{k}"], rel=1e-6)


def test_eval_resumes_without_recomputing_rows(trained_run, tiny_components, tmp_path, caplog):
    out = tmp_path / "eval"
    base = ["--checkpoints", f"{trained_run}:2", "--components", str(tiny_components), *VAL]
    assert eval_main([*base, "--out", str(out)]) == 0
    first = _rows(out)
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert eval_main([*base, "--out", str(out), "--weights", "ema,raw"]) == 0
    rows = _rows(out)
    assert [r["weights"] for r in rows] == ["ema", "raw"]
    assert rows[0] == first[0]  # kept as it was
    assert "already in the table" in caplog.text
    # Other settings are other numbers: the row is recomputed, no stale bin survives.
    assert eval_main([*base, "--out", str(out), "--sigma-bins", "2"]) == 0
    row = _rows(out)[0]
    assert row["val_loss_settings"] != first[0]["val_loss_settings"]
    assert "val_loss_bin_1" in row and "val_loss_bin_2" not in row


def test_val_loss_of_a_zero_velocity_model_matches_a_hand_computation(
    digit_shards, tiny_components
):
    """per_sample_losses with a model that predicts zero velocity: the loss is exactly the
    mean square of the fixed target noise - x0, computed here by hand."""
    from mmdit.conditioning import ConditioningConfig, load_vae

    vae = load_vae(ConditioningConfig(components=str(tiny_components), dtype="fp32"), "cpu")
    data = DataConfig(resolution=32)
    items = [e.item for e in eval_items(data, f"{digit_shards}/000000.tar", mode="images", limit=3)]
    batch = IndexedBatch([0, 1, 2], collate(items, [0, 0, 0]))

    def to_inputs(held_out):
        x0 = vae.encode_to_model(held_out.batch.images, sample=False)
        return val_loss.HeldOutInputs(
            held_out.indices, x0, torch.zeros(3, 5, 4096), torch.zeros(3, 2048)
        )

    def zero_model(x, sigma, context, pooled):
        return torch.zeros_like(x)

    losses = val_loss.per_sample_losses(zero_model, [to_inputs(batch)], bins=2, noise_seed=7)
    x0 = to_inputs(batch).latents
    for i in range(3):
        for k in range(2):
            noise = val_loss.fixed_noise(tuple(x0.shape[1:]), 7, i, k)
            expected = float(((noise - x0[i]) ** 2).mean())
            assert losses[i][k] == pytest.approx(expected, rel=1e-6)
    result = val_loss.reduce_losses(losses, bins=2, noise_seed=7)
    assert result.sigmas == [0.25, 0.75]
    assert result.mean == pytest.approx(
        np.mean([np.mean([losses[i][k] for i in range(3)]) for k in range(2)])
    )


def test_ordered_eval_pass_splits_over_ranks_without_overlap(digit_shards):
    data = DataConfig(resolution=32)
    spec = f"{digit_shards}/{{000000..000002}}.tar"
    whole = [(e.index, e.item.key) for e in eval_items(data, spec, mode="images", limit=40)]
    assert [i for i, _ in whole] == list(range(40))
    for world in (2, 3):
        parts = [
            [(e.index, e.item.key) for e in eval_items(
                data, spec, mode="images", rank=r, world_size=world, limit=40)]
            for r in range(world)
        ]  # fmt: skip
        assert sorted(x for p in parts for x in p) == whole
        assert all(i % world == r for r, p in enumerate(parts) for i, _ in p)


def test_fid_and_clip_score_in_the_table(
    trained_run, tiny_components, inception_weights, tiny_clip, tmp_path, caplog
):
    clip_config, clip_ckpt = tiny_clip
    args = [
        "--checkpoints", f"{trained_run}:4", "--components", str(tiny_components),
        "--metrics", "fid,clip", "--fid-samples", "6", "--steps", "2", "--fid-size", "32",
        "--inception-weights", str(inception_weights), "--clip-model", str(clip_config),
        "--clip-checkpoint", str(clip_ckpt), "--clip-pretrained-tag", "",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "eval"),
    ]  # fmt: skip
    assert eval_main(args) == 0
    row = _rows(tmp_path / "eval")[0]
    assert row["fid_samples"] == 6 and row["sample_seed"] == 0
    assert np.isfinite(row["fid"]) and row["fid"] >= 0
    assert 0 <= row["clip_score"] <= 100
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # Another checkpoint against the same reference: its statistics come from the cache.
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert eval_main([*args[:1], f"{trained_run}:2", *args[2:]]) == 0
    assert "cache hit" in caplog.text


def test_missing_inception_weights_fail_before_generating(
    trained_run, tiny_components, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    args = ["--checkpoints", f"{trained_run}:4", "--components", str(tiny_components)]
    with pytest.raises(SystemExit) as exit_info:
        eval_main([*args, "--metrics", "fid", "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "torch_home" in err
    assert not (tmp_path / "eval" / "table.json").exists()


def test_sample_grid_directory_and_exported_weights_agree(trained_run, tiny_components, tmp_path):
    from training.export import main as export_main

    # Exported weights carry no run config (so sample with SD3's shift 3): the same here.
    common = ["--components", str(tiny_components), "--steps", "3", "--seed", "5"]
    common += ["--shift", "3.0"]
    prompts = ["--prompt", "a handwritten digit one", "--prompt", "a handwritten digit two"]
    grid = tmp_path / "grid.png"
    ckpt = ["--checkpoint", str(trained_run), "--ema"]
    assert sample_main([*ckpt, *common, *prompts, "--size", "48x32", "--out", str(grid)]) == 0
    with Image.open(grid) as img:
        assert img.size == (2 + 2 * (48 + 2), 2 + 32 + 2)  # 2 images in one row, padding 2
    folder = tmp_path / "samples"
    assert sample_main([*ckpt, *common, *prompts, "--size", "32x32", "--out", str(folder)]) == 0
    lines = (folder / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(x)["seed"] for x in lines] == [5, 6]
    ours = np.asarray(Image.open(folder / "00001.png"))
    assert ours.shape == (32, 32, 3) and ours.std() > 0
    # The same EMA weights exported as a diffusers folder and as an SD3 single file.
    for fmt, target in (("diffusers", tmp_path / "exp"), ("sd3", tmp_path / "exp.safetensors")):
        ex = ["--checkpoint", str(trained_run), "--ema", "--format", fmt, "--out", str(target)]
        assert export_main(ex) == 0
        again = tmp_path / f"from_{fmt}"
        assert sample_main(["--checkpoint", str(target), *common, *prompts, "--size",
                            "32x32", "--out", str(again)]) == 0  # fmt: skip
        theirs = np.asarray(Image.open(again / "00001.png"))
        # The same weights and encoders: at most a rounding step of the 8-bit output.
        diff = np.abs(theirs.astype(int) - ours.astype(int))
        assert diff.max() <= 1, (fmt, diff.mean(), diff.max())


def test_sample_refuses_ema_for_an_exported_file_and_bad_sizes(
    trained_run, tiny_components, tmp_path, capsys
):
    from training.export import main as export_main

    target = tmp_path / "w.safetensors"
    ex = ["--checkpoint", str(trained_run), "--format", "safetensors", "--out", str(target)]
    assert export_main(ex) == 0
    base = ["--components", str(tiny_components), "--prompt", "x", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(target), "--ema", *base])
    assert "EMA weights can only be chosen for training checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(target), *base, "--size", "30x32"])
    assert "multiple of 16" in capsys.readouterr().err


def test_sample_defaults_to_the_training_runs_shift(trained_run, tiny_components, tmp_path):
    # trained_run sets neither eval.shift nor train.shift: it trained unshifted and samples so.
    base = ["--components", str(tiny_components), "--prompt", "a digit", "--steps", "1"]
    out = tmp_path / "default"
    assert sample_main(["--checkpoint", str(trained_run), *base, "--out", str(out)]) == 0
    assert json.loads((out / "settings.json").read_text())["shift"] == 1.0
    again = tmp_path / "explicit"
    args = ["--checkpoint", str(trained_run), *base, "--shift", "2.5", "--out", str(again)]
    assert sample_main(args) == 0
    assert json.loads((again / "settings.json").read_text())["shift"] == 2.5
