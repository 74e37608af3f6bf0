"""mmdit-eval's typed settings: flags, --set overrides and the run config resolve into one
EvalSettings whose settings ids match those of tables written before they were typed."""

from __future__ import annotations

import pytest

from eval.evaluate import build_parser
from eval.settings import resolve_settings, settings_id
from mmdit.typed_config import ConfigError

RUN = {"data": {"resolution": 64}, "eval": {"sample_steps": 12, "cfg_scale": 2.0}}


def _settings(*flags: str, run: dict = RUN):
    args = build_parser().parse_args(["--checkpoints", "x", "--out", "o", *flags])
    return resolve_settings(args, run, "x")


def test_ids_are_those_of_the_untyped_settings():
    # Computed with mmdit-eval's former dict settings for the same run config and flags.
    s = _settings("--steps", "7", "--cfg", "3", "--clip-checkpoint", "/m/clip.bin", run=RUN)
    ids = {m: settings_id(s, m) for m in ("val_loss", "fid", "clip")}
    assert ids == {"val_loss": "f3fef9c3ecdc", "fid": "fabb19e1b170", "clip": "2531fe6534ea"}


def test_flags_beat_set_which_beats_the_run_config():
    assert _settings().eval.sample_steps == 12
    assert _settings("--set", "eval.sample_steps=20").eval.sample_steps == 20
    assert _settings("--set", "eval.sample_steps=20", "--steps", "5").eval.sample_steps == 5
    s = _settings("--set", "data.caption=json:caption", "--cfg", "4")
    assert s.data.caption == "json:caption" and s.eval.cfg_scale == 4.0


def test_defaults_resolve_to_the_values_used():
    s = _settings("--val-shards", "held/{0..1}.tar", "--batch-size", "3")
    assert s.eval.fid_reference == "held/{0..1}.tar"  # default: the val shards
    assert s.eval.fid_size == 64  # default: data.resolution
    assert s.eval.shift == 1.0  # a run trained without a shift samples with 1
    assert s.batch_size == 3


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="sample_step"):
        _settings("--set", "eval.sample_step=20")
    with pytest.raises(ConfigError, match="sample_steps"):
        _settings("--steps", "0")
