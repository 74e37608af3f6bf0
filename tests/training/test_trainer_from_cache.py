"""Training from precomputed cache shards (SD3's way): latents drawn from the stored VAE
posterior, CFG dropout swapped in from the stored empty prompt, and the encoder check."""

from __future__ import annotations

import pytest

from data_pipeline.precompute import main as precompute_main
from tests.training.conftest import read_metrics, run_training, train_overrides

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def digit_cache(tmp_path_factory, digit_shards, tiny_components):
    out = tmp_path_factory.mktemp("digit_cache")
    argv = [
        "--config",
        "configs/debug_cpu.yaml",
        "--out",
        str(out),
        "--device",
        "cpu",
        f"data.shards={digit_shards}/{{000000..000007}}.tar",
        f"conditioning.components={tiny_components}",
        "data.resolution=32",
    ]
    assert precompute_main([*argv, "--rank", "0", "--world-size", "1"]) == 0
    return out


def _args(run_dir, cache, shards, components, **extra):
    settings = {
        "data.cache_shards": f"{cache}/{{000000..000007}}.tar",
        "train.max_steps": 4,
        "train.checkpoint_every": 4,
        "train.precision": "fp32",
        **extra,
    }
    return [
        "--config",
        "configs/debug_cpu.yaml",
        *train_overrides(run_dir, shards, components, **settings),
    ]


def test_trains_from_cache_shards_and_resumes(tmp_path, digit_cache, digit_shards, tiny_components):
    run_dir = tmp_path / "run"
    first = run_training(1, _args(run_dir, digit_cache, digit_shards, tiny_components))
    assert first.returncode == 0, first.stderr[-3000:]
    losses = {s: r["loss"] for s, r in read_metrics(run_dir).items()}
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < v < 100 for v in losses.values())
    assert read_metrics(run_dir)[4]["bad_samples"]["good"] > 0

    more = _args(run_dir, digit_cache, digit_shards, tiny_components, **{"train.max_steps": 6})
    resumed = run_training(1, more)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000004" in resumed.stderr
    assert sorted(read_metrics(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_a_cache_from_other_encoders_is_refused(
    tmp_path, digit_cache, digit_shards, tiny_components
):
    run_dir = tmp_path / "run"
    other = _args(
        run_dir, digit_cache, digit_shards, tiny_components, **{"conditioning.t5_max_length": 33}
    )
    result = run_training(1, other)
    assert result.returncode != 0
    assert "t5_max_length" in result.stderr
