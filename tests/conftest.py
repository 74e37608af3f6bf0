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
    from mmdit.testing.components import make_tiny_components

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


@pytest.fixture(scope="session")
def digit_cache(tmp_path_factory, digit_shards, tiny_components):
    """The digit shards precomputed (VAE posteriors + text embeddings of the tiny components),
    8 cache shards at 32 px: what SD3-style runs train from."""
    from data_pipeline.precompute import main as precompute_main

    out = tmp_path_factory.mktemp("digit_cache")
    argv = [
        "--config", "configs/debug_cpu.yaml", "--out", str(out), "--device", "cpu",
        f"data.shards={digit_shards}/{{000000..000007}}.tar",
        f"conditioning.components={tiny_components}", "data.resolution=32",
        "--rank", "0", "--world-size", "1",
    ]  # fmt: skip
    assert precompute_main(argv) == 0
    return out
