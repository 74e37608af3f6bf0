"""Shared test set-up: marker policy and small fixtures."""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # Only `gpu` tests are ever skipped, and only when there is no CUDA device; slow,
    # distributed and slurm tests always run (CI included).
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory):
    """A seeded tiny SD3 component directory (diffusers layout), built once per session."""
    from mmdit.tiny_components import make_tiny_components

    return make_tiny_components(tmp_path_factory.mktemp("components") / "sd3-tiny", seed=0)


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory):
    """8 shards x 16 scikit-learn digits (32 px, square: one bucket at resolution 32)."""
    from sklearn.datasets import load_digits

    from tests.data_pipeline.conftest import make_tar
    from tests.training.conftest import digit_members

    digits = load_digits()
    root = tmp_path_factory.mktemp("digit_shards")
    per_shard = 16
    for s in range(8):
        members = []
        for i in range(s * per_shard, (s + 1) * per_shard):
            members += digit_members(i, digits.images[i], int(digits.target[i]))
        (root / f"{s:06d}.tar").write_bytes(make_tar(members))
    return root
