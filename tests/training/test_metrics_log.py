from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from tests.training.conftest import fill, small_tmpfs
from training.metrics_log import METRICS_FILE, MetricsLogger, flatten


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def read_jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def write_steps(run_dir, steps, resume_step=0):
    with MetricsLogger(run_dir, is_writer=True, max_steps=100, resume_step=resume_step) as log:
        for step in steps:
            log.log(step, {"loss": 1.0 / step})


def test_jsonl_holds_one_typed_object_per_log(tmp_path):
    with MetricsLogger(tmp_path, is_writer=True, max_steps=10) as log:
        log.log(1, {"loss": 0.5, "lr": np.float32(1e-4), "skipped": 0, "sigma": {"bin0": 0.25}})
        log.log(2, {"loss": 0.4})
    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    first = records[0]
    assert type(first["step"]) is int and type(first["time"]) is float
    assert first["loss"] == 0.5 and type(first["skipped"]) is int
    assert first["lr"] == pytest.approx(1e-4)
    assert first["sigma"] == {"bin0": 0.25}  # nested in JSONL, flattened for TensorBoard


def test_device_tensors_are_rejected_with_the_fix(tmp_path):
    with MetricsLogger(tmp_path, is_writer=True, max_steps=10) as log:
        with pytest.raises(TypeError, match=r"'loss'.*\.item\(\)"):
            log.log(1, {"loss": torch.tensor(0.5)})
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3})


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    write_steps(tmp_path, range(1, 11))
    write_steps(tmp_path, range(7, 9), resume_step=6)
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert not list(tmp_path.glob("*.tmp"))  # the atomic rewrite left no temp file


def test_a_torn_last_line_is_dropped(tmp_path):
    write_steps(tmp_path, range(1, 4))
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 4, "time": 1.0, "lo')  # killed mid-write
    write_steps(tmp_path, [4], resume_step=3)
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 4]


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, is_writer=True, max_steps=10) as log:
        log.log(5, {"loss": 0.25, "sigma": {"bin0": 1.5}, "note": "text is JSONL-only"})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "sigma/bin0"}
    (event,) = acc.Scalars("loss")
    assert event.step == 5 and event.value == pytest.approx(0.25)


def test_tensorboard_purges_the_steps_a_resumed_run_redoes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_steps(tmp_path, range(1, 11))
    # TensorBoard reads a directory's event files in name order, and the name starts with the
    # creation second: a real resume starts long after the first writer; here, wait for the
    # next second (two files of one second sort by host and pid, seen failing on a clean clone).
    time.sleep(1.1)
    write_steps(tmp_path, range(7, 9), resume_step=6)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_non_writer_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, is_writer=False, max_steps=10) as log:
        log.log(1, {"loss": 0.5})
    assert not run_dir.exists()


def test_wandb_project_without_wandb_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install wandb.*unset train\.wandb_project"):
        MetricsLogger(tmp_path, is_writer=True, max_steps=10, wandb_project="sd3-scaling")


def test_console_line_has_the_rates_and_an_eta(tmp_path, capsys):
    clock = FakeClock()
    metrics = {
        "loss": 0.51234,
        "lr": 1e-4,
        "samples_per_s": 34.5,
        "tflops_per_s": 12.1,
        "mfu": 0.032,
        "data_wait_frac": 0.012,
    }
    with MetricsLogger(
        tmp_path, is_writer=True, max_steps=1000, resume_step=100, clock=clock
    ) as log:
        clock.t += 20.0
        log.log(120, metrics)  # 20 steps since the resume step in 20 s: 1 step/s
    line = capsys.readouterr().out.strip()
    assert line == (
        "step 120/1000 | loss 0.5123 | lr 1.00e-04 | 34.5 samples/s | 12.1 TFLOP/s | "
        "MFU 3.2% | data wait 1.2% | ETA 0:14:40"
    )


def test_console_line_tolerates_missing_keys_and_smooths_the_rate():
    clock = FakeClock()
    log = MetricsLogger("unused", is_writer=False, max_steps=100, clock=clock)
    assert log.console_line(0, {}) == "step 0/100"  # no rate measured yet: no ETA
    clock.t += 10.0
    log.log(10, {})  # 1 step/s
    clock.t += 5.0
    log.log(20, {})  # 2 steps/s, smoothed towards it
    assert 1.0 < log.steps_per_s < 2.0
    line = log.console_line(20, {"loss": 0.3})
    assert line.startswith("step 20/100 | loss 0.3000 | ETA ")


def test_flatten_names_nested_metrics_with_slashes():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}


# TensorBoard's writer thread re-raises the disk's error when it dies: expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_loses_metrics_lines_but_never_ends_the_run(tmp_path, capsys):
    with small_tmpfs(tmp_path / "mnt", 1 << 20) as mnt:
        log = MetricsLogger(mnt / "run", is_writer=True, max_steps=100)
        log.log(1, {"loss": 1.0})
        filler = fill(mnt)
        for step in range(2, 200):  # past the file buffer and TensorBoard's writer thread
            log.log(step, {"loss": 1.0 / step, "big": {f"bin{i}": 0.5 for i in range(50)}})
        log.close()
        err = capsys.readouterr().err
        assert err.count("warning: ") == 1 and "No space left on device" in err, err
        steps = [r["step"] for r in read_jsonl(mnt / "run")]  # whole lines only, none torn
        assert steps == list(range(1, len(steps) + 1)) and len(steps) < 199, steps
        filler.unlink()
        with MetricsLogger(mnt / "run", is_writer=True, max_steps=100, resume_step=199) as log:
            log.log(200, {"loss": 0.1})  # space again: the file goes on, still whole lines
        assert read_jsonl(mnt / "run")[-1]["step"] == 200


def test_wandb_offline_resume_sends_each_step_once(tmp_path, monkeypatch):
    """A rerun from a checkpoint older than W&B's last row does not send those steps again,
    and a step W&B lacks (logged to metrics.jsonl only) is replayed from metrics.jsonl."""
    wandb = pytest.importorskip("wandb", reason="wandb is the '.[wandb]' extra (make setup has it)")
    from training import wandb_offline
    from training.metrics_log import WANDB_DIR, WANDB_ID_FILE

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    common = dict(is_writer=True, max_steps=10, wandb_project="p", wandb_mode="offline")
    with MetricsLogger(tmp_path, **common, config={"lr": 1}, config_yaml="lr: 1\n") as log:
        for step in (1, 2, 3, 4):
            log.log(step, {"loss": 1.0 / step})
    # Each logger here stands for one job: its files are complete once wandb's service (shared
    # by the runs of a process) has stopped, as they are when a job's process has exited; and
    # jobs start seconds apart (wandb names a run's directory by the second it started).
    wandb.teardown()
    time.sleep(1.1)
    # metrics.jsonl got step 5 but W&B did not (what a kill -9 leaves).
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write(json.dumps({"step": 5, "time": 0.0, "loss": 0.2}) + "\n")
    with MetricsLogger(tmp_path, **common, resume_step=5) as log:
        log.log(6, {"loss": 1.0 / 6})
    wandb.teardown()
    time.sleep(1.1)
    with MetricsLogger(tmp_path, **common, resume_step=2) as log:  # an older checkpoint
        for step in (3, 4, 5, 6, 7):
            log.log(step, {"loss": 1.0 / step})
    wandb.teardown()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    files = wandb_offline.run_files(tmp_path / WANDB_DIR, run_id)
    steps = [sorted(wandb_offline.history(p)) for p in files]
    assert steps == [[1, 2, 3, 4], [5, 6], [7]]
    assert json.loads(wandb_offline.history(files[1])[5]["loss"]) == 0.2
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]
