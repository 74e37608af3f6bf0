"""Shared test set-up: marker policy, the grouping that lets `make test` run the suite on
several pytest-xdist workers, and the session fixtures every worker shares."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (`make test`)
        # The workers share the cores: one compute thread each, and in every process they
        # start (torch, numpy and the trainer's ranks read it when they load), rather than
        # each worker's OpenMP threads spinning against the other's.
        os.environ["OMP_NUM_THREADS"] = "1"


def _worker_group(nodeid: str) -> str:
    """The group of tests one pytest-xdist worker runs, in order: a module, so its
    module-scoped fixtures (one trained run serving many assertions) are built once; all of
    tests/slurm/ together, as its tests share the session's one local Slurm cluster."""
    module = nodeid.split("::")[0]
    return "tests/slurm" if module.startswith("tests/slurm/") else module


def pytest_xdist_make_scheduler(config, log):
    """Under `pytest -n N` (`make test`), hand out whole groups (_worker_group), in collection
    order (pytest_collection_modifyitems puts the longest first)."""
    if config.getvalue("dist") != "load":  # an explicit --dist is obeyed
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _worker_group(nodeid)

    return GroupScheduling(config, log)


def _heavy_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """Longest work first, so no long group starts last and runs alone at the end: the Slurm
    group, then modules with `slow` tests, then the rest (collection order within each)."""
    slow = {_worker_group(i.nodeid) for i in items if i.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        group = _worker_group(item.nodeid)
        return 0 if group == "tests/slurm" else 1 if group in slow else 2

    return sorted(items, key=rank)  # stable


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the order groups start in
        items[:] = _heavy_first(items)
    # Only `gpu` tests are ever skipped, and only when there is no CUDA device; slow,
    # distributed and slurm tests always run (CI included).
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A directory that `build(directory)` fills once per test run. Under pytest-xdist the
    workers share it: the first to get the lock builds it, the others wait and reuse it (the
    users of a session fixture only read it). A failed build leaves nothing marked built."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        build(directory)
        return directory
    directory = tmp_path_factory.getbasetemp().parent / f"shared-{name}"  # all workers' parent
    with open(f"{directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / ".built").exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            (directory / ".built").touch()
    return directory


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory):
    """A seeded tiny SD3 component directory (diffusers layout), built once per session."""
    from mmdit.testing.components import make_tiny_components

    def build(directory: Path) -> None:
        make_tiny_components(directory / "sd3-tiny", seed=0)

    return built_once(tmp_path_factory, "components", build) / "sd3-tiny"


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory):
    """8 shards x 16 scikit-learn digits (32 px, square: one bucket at resolution 32)."""
    from sklearn.datasets import load_digits

    from tests.data_pipeline.conftest import make_tar
    from tests.training.conftest import digit_members

    def build(root: Path) -> None:
        digits = load_digits()
        per_shard = 16
        for s in range(8):
            members = []
            for i in range(s * per_shard, (s + 1) * per_shard):
                members += digit_members(i, digits.images[i], int(digits.target[i]))
            (root / f"{s:06d}.tar").write_bytes(make_tar(members))

    return built_once(tmp_path_factory, "digit_shards", build)


@pytest.fixture(scope="session")
def digit_cache(tmp_path_factory, digit_shards, tiny_components):
    """The digit shards precomputed (VAE posteriors + text embeddings of the tiny components),
    8 cache shards at 32 px: what SD3-style runs train from."""
    from data_pipeline.precompute import main as precompute_main

    def build(out: Path) -> None:
        argv = [
            "--config", "configs/debug_cpu.yaml", "--out", str(out), "--device", "cpu",
            f"data.shards={digit_shards}/{{000000..000007}}.tar",
            f"conditioning.components={tiny_components}", "data.resolution=32",
            "--rank", "0", "--world-size", "1",
        ]  # fmt: skip
        assert precompute_main(argv) == 0

    return built_once(tmp_path_factory, "digit_cache", build)
