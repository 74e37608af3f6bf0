"""Fixtures for trainer tests: digit shards (scikit-learn's handwritten digits, real images),
a helper that runs `mmdit-train` as a real multi-process DeepSpeed job, and the
uninterrupted reference job the fault tests compare their per-step losses with."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.testing.demo_set import DIGIT_WORDS, render_digit
from mmdit.distributed import free_ports
from tests.conftest import built_once

REPO = Path(__file__).resolve().parents[2]


def digit_members(index: int, image: np.ndarray, label: int) -> list[tuple[str, bytes]]:
    img = render_digit(image, 32)  # dark ink on white paper, as the demo set draws it
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    key = f"digit{index:05d}"
    meta = {"width": 32, "height": 32, "source": "sklearn.datasets.load_digits"}
    return [
        (f"{key}.png", buf.getvalue()),
        (f"{key}.txt", f"a handwritten digit {DIGIT_WORDS[label]}".encode()),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


def train_overrides(run_dir: Path, shards: Path, components: Path, **extra) -> list[str]:
    base = {
        "train.run_dir": str(run_dir),
        "data.shards": str(shards),
        "conditioning.components": str(components),
        "data.resolution": "32",
        "data.num_workers": "1",
        "data.shuffle_buffer": "8",
        "model.depth": "2",
        "model.sample_size": "4",
        "model.pos_embed_max_size": "8",
        "train.micro_batch_size": "2",
        "train.log_every": "1",
        "train.warmup_steps": "2",
        "train.ema_decay": "0.9",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def job_args(run_dir: Path, shards: Path, components: Path, **settings) -> list[str]:
    """`mmdit-train`'s arguments for a tiny job: configs/debug_cpu.yaml, the sizes of
    train_overrides, then `settings` (dotted names)."""
    return [
        "--config",
        "configs/debug_cpu.yaml",
        *train_overrides(run_dir, shards, components, **settings),
    ]


# What the tests comparing loss curves train with, besides their step counts.
CURVE_SETTINGS = {"train.global_batch_size": 4, "train.precision": "bf16", "train.lr": 1e-3}


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`result`, asserting that the job finished (its stderr's end is the failure message)."""
    assert result.returncode == 0, result.stderr[-4000:]
    return result


INSTRUMENTED = Path(__file__).with_name("instrumented_train.py")


def run_training(
    nproc: int,
    args: list[str],
    *,
    instruments: dict | None = None,
    timeout: float = 300,
    torchrun_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run `mmdit-train` (with test instruments, see instrumented_train.py) as a real job:
    torchrun with `nproc` gloo ranks, or one plain process when nproc == 1. Its own session,
    so an instrumented kill -9 of the job's process group spares pytest."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, str(INSTRUMENTED), *args]
        # A single process still opens a group; a port from the OS, as fixed ones collide
        # with another test session or a demo on the same machine.
        env["MASTER_PORT"] = str(free_ports(1)[0])
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--standalone",  # the rendezvous on a port the OS picks
            *torchrun_args,
            str(INSTRUMENTED),
            *args,
        ]
    env.update(instruments or {})
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["step"]] = row
    return out


# The job the fault tests break: 2 ranks, bf16 (deterministic on the CPU), 6 steps, a
# checkpoint every 2. The faults.* settings a test adds do not change its numbers.
REFERENCE_STEPS = 6
REFERENCE_SETTINGS = {
    "train.max_steps": REFERENCE_STEPS,
    "train.checkpoint_every": 2,
    "train.precision": "bf16",
}


def reference_args(run_dir: Path, shards: Path, components: Path, **extra) -> list[str]:
    return job_args(run_dir, shards, components, **{**REFERENCE_SETTINGS, **extra})


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses from metrics.jsonl (fault records, which have none, are left out)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip() and "loss" in (row := json.loads(line)):
            out[row["step"]] = row["loss"]
    return out


# The reference job's ranks are slow in different ways, which the straggler report must tell
# apart (tests/training/test_stragglers.py): rank 1's device (0.05 s in each block's forward)
# and rank 0's loader (0.3 s for each batch). Sleeping changes no number.
REFERENCE_SLOW = {"MMDIT_TEST_SLOW": "compute:1:0.05,data:0:0.3"}
REFERENCE_STDERR = "stderr.txt"  # beside the run directory


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, digit_shards, tiny_components) -> Path:
    """The run directory of the reference job, run without a fault once per session; its
    stderr is in RUN/../stderr.txt."""

    def build(directory: Path) -> None:
        args = reference_args(directory / "run", digit_shards, tiny_components)
        result = run_training(2, args, instruments=REFERENCE_SLOW, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        (directory / REFERENCE_STDERR).write_text(result.stderr)

    return built_once(tmp_path_factory, "faults_reference", build) / "run"


@pytest.fixture(scope="session")
def reference_losses(reference_run) -> dict[int, float]:
    found = losses(reference_run)
    assert sorted(found) == list(range(1, REFERENCE_STEPS + 1)), found
    return found


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: int):
    """A tmpfs of `size` bytes at `mount_point` (a disk that fills up for real), unmounted
    afterwards; the test is skipped, saying why, where it cannot be mounted (not root)."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(
            f"cannot mount a tmpfs at {mount_point} ({mounted.stderr.strip()}): the full-disk "
            "tests need root or CAP_SYS_ADMIN"
        )
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """A filler file that takes all but `leave` bytes of the file system's free space."""
    stat = os.statvfs(directory)
    filler = directory / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(stat.f_bavail * stat.f_frsize - leave, 1))
    return filler
