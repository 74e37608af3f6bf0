"""Training from precomputed cache shards (SD3's way): latents drawn from the stored VAE
posterior, CFG dropout swapped in from the stored empty prompt, and the encoder check; 2 ranks
in bf16, the way cluster run files train."""

from __future__ import annotations

import pytest

from tests.training.conftest import read_metrics, run_training, train_overrides

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _args(run_dir, cache, shards, components, **extra):
    settings = {
        "data.cache_shards": f"{cache}/{{000000..000007}}.tar",
        "train.max_steps": 6,
        "train.checkpoint_every": 3,
        "train.global_batch_size": 4,
        "train.precision": "bf16",
        **extra,
    }
    return [
        "--config",
        "configs/debug_cpu.yaml",
        *train_overrides(run_dir, shards, components, **settings),
    ]


def _losses(run_dir):
    return {s: r["loss"] for s, r in read_metrics(run_dir).items()}


def test_trains_from_cache_shards_and_resumes_exactly_after_kill_9(
    tmp_path, digit_cache, digit_shards, tiny_components
):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = run_training(2, _args(whole, digit_cache, digit_shards, tiny_components))
    assert first.returncode == 0, first.stderr[-3000:]
    losses = _losses(whole)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(0 < v < 100 for v in losses.values())
    assert read_metrics(whole)[6]["bad_samples"]["good"] > 0

    args = _args(resumed, digit_cache, digit_shards, tiny_components)
    killed = run_training(2, args, instruments={"MMDIT_TEST_KILL_AFTER_STEP": "4"})
    assert killed.returncode != 0
    again = run_training(2, args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step_00000003" in again.stderr
    assert _losses(resumed) == losses  # bf16, fresh posterior draws: still the same floats


def test_a_cache_from_other_encoders_is_refused(
    tmp_path, digit_cache, digit_shards, tiny_components
):
    run_dir = tmp_path / "run"
    other = _args(
        run_dir, digit_cache, digit_shards, tiny_components, **{"conditioning.t5_max_length": 33}
    )
    result = run_training(2, other)
    assert result.returncode != 0
    assert "t5_max_length" in result.stderr
