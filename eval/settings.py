"""`mmdit-eval`'s settings, typed: the run's `eval` and `data` sections with the command line on
top, as one `EvalSettings`.

The setting flags are `EvalConfig` fields under the command line's short names (``--steps`` is
``eval.sample_steps``): each flag takes its type from the field, and ``--set KEY=VALUE``
(repeatable) reaches any field of the two sections by its dotted name, e.g.
``--set eval.sample_steps=20 --set data.caption=json:caption``. Precedence: the defaults, the
first checkpoint's run config, ``--set``, then the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.config import DataConfig
from data_pipeline.eval_config import EvalConfig
from mmdit.flow import sampling_shift
from mmdit.typed_config import apply_dotted, apply_overrides, from_dict


@dataclass(frozen=True)
class Flag:
    """One setting flag: ``--name`` (dashes for underscores) sets ``eval.<field>``."""

    name: str
    field: str
    metavar: str | None = None
    help: str | None = None


VAL_LOSS_FLAGS = (
    Flag("val_shards", "val_shards", "SHARDS"),
    Flag("val_samples", "val_samples", "N", "first N samples; 0 = all"),
    Flag("sigma_bins", "sigma_bins", "K"),
    Flag("noise_seed", "noise_seed"),
)
SAMPLING_FLAGS = (
    Flag("fid_samples", "fid_samples", "N"),
    Flag("fid_reference", "fid_reference", "SHARDS|DIR", "default: the val shards"),
    Flag("fid_size", "fid_size", "PX", "square side (data.resolution)"),
    Flag("seed", "sample_seed", None, "generated image i uses seed + i"),
    Flag("steps", "sample_steps"),
    Flag("cfg", "cfg_scale"),
    Flag("shift", "shift", None, "sampler shift (default: the run's eval.shift)"),
    Flag("inception_weights", "inception_weights", "PATH"),
    Flag("clip_model", "clip_model", "NAME|JSON"),
    Flag("clip_checkpoint", "clip_checkpoint", "PATH"),
    Flag("clip_pretrained_tag", "clip_pretrained_tag", "TAG"),
)


@dataclass(frozen=True)
class _Sections:
    """The part of a run config `--set` may override."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class EvalSettings:
    """Every setting that changes a number, recorded per metric in a row's settings id.

    ``eval`` is resolved: ``fid_reference`` (its default, the val shards), ``fid_size`` (its
    default, data.resolution) and ``shift`` (0: the training run's shift at the FID size)
    hold the values actually used."""

    eval: EvalConfig
    data: DataConfig
    fid_prompts: str = ""  # prompts for an image-folder FID reference
    batch_size: int = 16


def add_setting_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The setting flags (default: the run config's value) and ``--set``; returns the FID and
    CLIP group for the caller's own sampling options."""
    hints = typing.get_type_hints(EvalConfig)
    groups = (
        ("validation loss (default: the run config's eval section)", VAL_LOSS_FLAGS),
        ("FID and CLIP score", SAMPLING_FLAGS),
    )
    for title, flags in groups:
        group = parser.add_argument_group(title)
        for flag in flags:
            group.add_argument(
                "--" + flag.name.replace("_", "-"),
                dest=flag.name,
                type=hints[flag.field],
                metavar=flag.metavar,
                help=flag.help,
            )
    group.add_argument(
        "--fid-prompts", metavar="FILE", help="prompts for an image-folder reference"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any eval.* or data.* setting, e.g. eval.sample_steps=20 (repeatable)",
    )
    return group


def resolve_settings(args: argparse.Namespace, run_config: Mapping, source: str) -> EvalSettings:
    """The settings for a checkpoint whose run config is ``run_config`` ({} for exported
    weights): the defaults, then the run config's eval and data sections, then ``--set``, then
    the flags given."""
    raw = {"eval": run_config.get("eval") or {}, "data": run_config.get("data") or {}}
    raw = apply_overrides(_Sections, raw, args.overrides)
    given = {
        f"eval.{flag.field}": getattr(args, flag.name)
        for flag in (*VAL_LOSS_FLAGS, *SAMPLING_FLAGS)
        if getattr(args, flag.name) is not None
    }
    sections = from_dict(_Sections, apply_dotted(_Sections, raw, given, "flags"), source=source)
    ev, data = sections.eval, sections.data
    side = ev.fid_size or data.resolution
    ev = dataclasses.replace(
        ev,
        fid_reference=ev.fid_reference or ev.val_shards,
        fid_size=side,
        # eval.shift 0 = the training run's own shift at the FID size.
        shift=sampling_shift(run_config, side, side, ev.shift),
    )
    return EvalSettings(ev, data, fid_prompts=args.fid_prompts or "", batch_size=args.batch_size)


def metric_settings(settings: EvalSettings, metric: str) -> dict:
    """The settings one metric's value depends on (its part of the settings id). The keys are
    the command line's names, as in the ids of tables written before the settings were typed."""
    ev = settings.eval
    if metric == "val_loss":
        data = {
            "resolution": settings.data.resolution,
            "max_aspect_ratio": settings.data.max_aspect_ratio,
            "caption": settings.data.caption,
        }
        # Bucket families change which bucket (so which crop) a held-out image gets; only
        # multi-resolution runs add the key, so existing settings ids stay as they were.
        if settings.data.resolutions:
            data["resolutions"] = list(settings.data.resolutions)
        return {
            "val_shards": ev.val_shards,
            "val_samples": ev.val_samples,
            "sigma_bins": ev.sigma_bins,
            "noise_seed": ev.noise_seed,
            "data": data,
        }
    out = {
        "fid_samples": ev.fid_samples,
        "fid_reference": ev.fid_reference,
        "fid_prompts": settings.fid_prompts,
        "fid_size": ev.fid_size,
        "seed": ev.sample_seed,
        "steps": ev.sample_steps,
        "cfg": ev.cfg_scale,
        "shift": ev.shift,
    }
    if metric == "fid":
        out["inception_weights"] = Path(ev.inception_weights or "default").name
    else:
        out["clip"] = [ev.clip_model, Path(ev.clip_checkpoint).name]
    return out


def settings_id(settings: EvalSettings, metric: str) -> str:
    """A row's ``<metric>_settings`` column: a short hash of ``metric_settings``."""
    text = json.dumps(metric_settings(settings, metric), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
