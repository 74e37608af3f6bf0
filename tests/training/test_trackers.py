"""What a person watching a run sees in W&B (real wandb, offline) and TensorBoard.

One 2-rank job with validation, previews and W&B in offline mode is killed with kill -9 after
step 5 and rerun; its W&B offline files and TensorBoard events are read back and compared with
metrics.jsonl, which the trainer tests already hold to the uninterrupted curve.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.training.conftest import read_metrics, run_training, train_overrides
from training import wandb_offline
from training.metrics_log import RUN_CONFIG_FILE, TENSORBOARD_DIR, WANDB_DIR, WANDB_ID_FILE

wandb = pytest.importorskip(
    "wandb", reason="wandb is the '.[wandb]' extra (make setup installs it)"
)
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
KILLED_AFTER = 5  # past the step-4 checkpoint; steps 1..4 are in metrics.jsonl


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, digit_shards, tiny_components) -> Path:
    root = tmp_path_factory.mktemp("watched")
    run_dir = root / "run"
    settings = {
        "train.max_steps": STEPS,
        "train.checkpoint_every": 2,
        "train.precision": "bf16",
        "train.preview_every": 3,
        "train.wandb_project": "mmdit-tests",
        "train.wandb_mode": "offline",
        "eval.val_shards": f"{digit_shards}/{{000006..000007}}.tar",
        "eval.val_every": 3,
        "eval.val_samples": 8,
        "eval.sigma_bins": 4,
    }
    args = [
        "--config",
        "configs/debug_cpu.yaml",
        *train_overrides(run_dir, digit_shards, tiny_components, **settings),
    ]
    # No network: offline mode, and wandb's own settings directory inside the test's tmp.
    env = {
        "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_SILENT": "true",
    }
    killed = run_training(
        2, args, instruments={**env, "MMDIT_TEST_KILL_AFTER_STEP": str(KILLED_AFTER)}
    )
    assert killed.returncode != 0
    assert max(read_metrics(run_dir)) == 4
    resumed = run_training(2, args, instruments=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr
    return run_dir


def _run_id(run_dir: Path) -> str:
    return (run_dir / WANDB_ID_FILE).read_text().strip()


def test_both_incarnations_append_to_one_wandb_run_from_rank_0_only(watched_run):
    run_id = _run_id(watched_run)
    files = wandb_offline.run_files(watched_run / WANDB_DIR, run_id)
    # One offline run per job (rank 1 never opens one), both with the id kept in the run dir.
    assert len(files) == 2, sorted(p.parent.name for p in (watched_run / WANDB_DIR).iterdir())
    assert sorted((watched_run / WANDB_DIR).glob("offline-run-*")) == [f.parent for f in files]
    # The killed job's file may hold nothing past its header (wandb buffers its writes: that
    # is why steps are replayed); whatever it holds, and the resumed job's file, name the id.
    for i, path in enumerate(files):
        runs = [r.run for r in wandb_offline.records(path) if r.WhichOneof("record_type") == "run"]
        assert (runs or i < len(files) - 1) and {r.run_id for r in runs} <= {run_id}


def test_wandb_holds_every_logged_step_once_with_the_jsonl_numbers(watched_run):
    files = wandb_offline.run_files(watched_run / WANDB_DIR, _run_id(watched_run))
    first, second = (wandb_offline.history(p) for p in files)
    # wandb buffers its file writes: the killed job's file keeps a prefix of its steps (often
    # none); the rerun replays the rest up to its checkpoint (step 4) from metrics.jsonl.
    assert sorted(first) == list(range(len(first))) and len(first) <= 4
    assert not set(first) & set(second)  # no step twice
    rows = {**first, **second}
    jsonl = read_metrics(watched_run)
    assert sorted(rows) == sorted(jsonl) == list(range(STEPS + 1))  # none missing
    for step, row in rows.items():
        key = "loss" if step else "val_loss"
        assert json.loads(row[key]) == pytest.approx(jsonl[step][key], rel=1e-12)
    assert json.loads(rows[6]["val_loss_by_sigma/bin3"]) == pytest.approx(
        jsonl[6]["val_loss_by_sigma"]["bin3"], rel=1e-12
    )
    # Images (replayed ones too), histograms and the per-bin chart made it in as W&B media.
    assert json.loads(rows[3]["preview/_type"]) == "image-file"
    assert json.loads(rows[6]["preview/_type"]) == "image-file"
    assert json.loads(rows[5]["sigma_drawn/_type"]) == "histogram"
    assert json.loads(rows[6]["val_loss_by_sigma_chart_table/_type"]) == "table-file"


def test_wandb_gets_the_config_and_the_resolved_run_file(watched_run):
    # The resumed job's file: the killed one's may hold no records at all (buffered writes).
    path = wandb_offline.run_files(watched_run / WANDB_DIR, _run_id(watched_run))[-1]
    run = next(r.run for r in wandb_offline.records(path) if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["max_steps"] == STEPS and config["eval"]["sigma_bins"] == 4
    saved = [
        f.path
        for r in wandb_offline.records(path)
        if r.WhichOneof("record_type") == "files"
        for f in r.files.files
    ]
    assert RUN_CONFIG_FILE in saved
    resolved = yaml.safe_load((watched_run / RUN_CONFIG_FILE).read_text())
    assert resolved["train"]["run_dir"] == str(watched_run)
    attached = path.parent / "files" / RUN_CONFIG_FILE
    assert attached.read_text() == (watched_run / RUN_CONFIG_FILE).read_text()


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    size = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}  # 0: keep everything
    return EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance=size).Reload()


def test_tensorboard_has_scalars_once_per_step_previews_and_sigma_histograms(watched_run):
    tb = _tensorboard(watched_run)
    jsonl = read_metrics(watched_run)
    loss = tb.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))  # purged and redone: once each
    assert [e.value for e in loss] == pytest.approx([jsonl[s]["loss"] for s in range(1, 7)])
    for name in ("grad_norm", "skipped_in_window", "val_loss_by_sigma/bin0"):
        assert tb.Scalars(name), name
    assert [e.step for e in tb.Scalars("val_loss_by_sigma/bin2")] == [0, 3, 6]
    assert tb.Scalars("val_loss_by_sigma/bin2")[-1].value == pytest.approx(
        jsonl[6]["val_loss_by_sigma"]["bin2"]
    )
    previews = tb.Images("preview")
    assert [e.step for e in previews] == [3, 6]
    assert (previews[-1].width, previews[-1].height) == (70, 70)  # the 2x2 grid of 32 px

    hist = tb.Histograms("sigma_drawn")
    assert [e.step for e in hist] == list(range(1, STEPS + 1))
    # Every sigma drawn in a step is counted: 2 ranks x 2 samples x 1 micro batch.
    for event in hist:
        h = event.histogram_value
        assert sum(h.bucket) == 4
        assert 0.0 <= h.min <= h.max <= 1.0
    assert RUN_CONFIG_FILE in "".join(tb.Tags()["tensors"])


def test_wandb_offline_reader_stops_at_a_torn_file(watched_run, tmp_path):
    path = wandb_offline.run_files(watched_run / WANDB_DIR, _run_id(watched_run))[-1]
    whole = list(wandb_offline.raw_records(path))
    torn = tmp_path / path.name
    data = path.read_bytes()
    torn.write_bytes(data[: len(data) - 100])
    kept = list(wandb_offline.raw_records(torn))
    assert 0 < len(kept) < len(whole) and kept == whole[: len(kept)]
    (tmp_path / "bad.wandb").write_bytes(b"not a run file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        list(wandb_offline.raw_records(tmp_path / "bad.wandb"))


def test_sigma_histogram_counts_match_the_logit_normal_draws(watched_run):
    """The drawn sigmas lie inside (0, 1) and, with logit-normal(0, 1), mostly in the middle."""
    tb = _tensorboard(watched_run)
    buckets = np.sum([e.histogram_value.bucket for e in tb.Histograms("sigma_drawn")], axis=0)
    assert buckets.sum() == 4 * STEPS
    assert buckets[:5].sum() + buckets[-5:].sum() < buckets.sum() / 2
    assert os.path.getsize(watched_run / RUN_CONFIG_FILE) > 0


def test_mmdit_report_on_the_real_run(watched_run, tmp_path):
    from eval.report import main

    out = tmp_path / "report.html"
    assert main([str(watched_run), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<img") == 4 + 2  # the figures and the previews of steps 3 and 6
    assert "step 6 (yes)" in page and "step 4 (yes)" in page
