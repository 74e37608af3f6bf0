"""The val-loss settings id names the bucket families only for multi-resolution runs."""

from __future__ import annotations

from data_pipeline.config import DataConfig
from data_pipeline.eval_config import EvalConfig
from eval.settings import EvalSettings, settings_id

EVAL = EvalConfig(val_shards="held_out", val_samples=64, sigma_bins=8, noise_seed=0)


def _id(data: DataConfig) -> str:
    return settings_id(EvalSettings(EVAL, data), "val_loss")


def test_families_enter_the_id_and_one_resolution_ids_stay():
    one = _id(DataConfig(resolution=256))
    assert one == "b0a579c56817"  # the id before data.resolutions existed
    assert _id(DataConfig(resolution=256, resolutions=(256, 512))) != one
