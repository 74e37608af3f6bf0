"""Which shift sampling uses for a run: eval.shift, else the run's training shift."""

from __future__ import annotations

import pytest

from data_pipeline.eval_config import EvalConfig
from mmdit.flow import sampling_shift
from training.config import TrainConfig


def test_sampling_shift_follows_the_run():
    fresh = {"eval": {"shift": 0.0}, "train": {"shift": 1.0, "shift_base_resolution": 0}}
    assert sampling_shift(fresh, 512, 512) == 1.0  # trained without a shift: none
    fixed = {"eval": {"shift": 0.0}, "train": {"shift": 3.0, "shift_base_resolution": 0}}
    assert sampling_shift(fixed, 512, 512) == 3.0
    rule = {"eval": {"shift": 0.0}, "train": {"shift": 1.0, "shift_base_resolution": 256}}
    assert sampling_shift(rule, 1024, 1024) == 4.0
    assert sampling_shift(rule, 512, 256) == pytest.approx(2**0.5)
    # A run made before train.shift existed recorded eval.shift 3.0: it samples as before.
    old = {"eval": {"shift": 3.0}, "train": {}}
    assert sampling_shift(old, 1024, 1024) == 3.0
    # Exported weights carry no run config: SD3's 3.0. An explicit value always wins.
    assert sampling_shift({}, 1024, 1024) == 3.0
    assert sampling_shift(rule, 1024, 1024, override=2.5) == 2.5


def test_shift_keys_are_validated_with_one_line():
    with pytest.raises(ValueError, match=r"train.shift=0.0 must be > 0"):
        TrainConfig(shift=0.0)
    with pytest.raises(ValueError, match="train.shift_base_resolution=-1"):
        TrainConfig(shift_base_resolution=-1)
    with pytest.raises(ValueError, match="eval.shift=-1.0 must be >= 0"):
        EvalConfig(shift=-1.0)
