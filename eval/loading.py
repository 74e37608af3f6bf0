"""What sampling and evaluation need besides the weights: the run's settings, which frozen
conditioning (VAE, text encoders) to load (mmdit.conditioning loads it) and the device.

A training checkpoint carries its run config, so the conditioning it was trained with (the
encoders, T5 length, dtype) is reused; `--components DIR` points at where those components
live on this machine. Exported weights carry no run config: the defaults of
`ConditioningConfig` (SD3: CLIP-L + bigG + T5, 77 tokens) apply with `--components`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from mmdit.checkpoints import CheckpointError, read_run_config
from mmdit.conditioning import ConditioningConfig
from mmdit.typed_config import from_dict
from mmdit.weights import Weights


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_config_of(weights: Weights) -> Mapping:
    """The checkpoint's resolved run config as plain data ({} for exported weights)."""
    if weights.kind != "checkpoint":
        return {}
    return read_run_config(weights.source)


def conditioning_of(
    weights: Weights, components: str | None, default_dtype: str = "fp32"
) -> ConditioningConfig:
    """The run's conditioning section; for exported weights the SD3 defaults, with the
    encoders run in `default_dtype` (the sampling dtype: bf16 on GPUs, fp32 on CPUs)."""
    section = dict(run_config_of(weights).get("conditioning") or {"dtype": default_dtype})
    config = from_dict(ConditioningConfig, section, source=f"{weights.source}: conditioning")
    changes: dict = {}
    if components:
        # Per-component paths of the training machine do not apply to another machine.
        changes = {f.name: "" for f in dataclasses.fields(config) if f.name.endswith("_path")}
        changes["components"] = components
    config = dataclasses.replace(config, **changes)
    if not config.components and not config.paths():
        raise CheckpointError(
            f"{weights.source}: no frozen components to load; pass --components DIR (an SD3-"
            "layout directory with vae/, text_encoder*/ and tokenizer*/, e.g. made by "
            "mmdit-make-tiny-components or downloaded from the SD3 repository)"
        )
    if config.components and not Path(config.components).is_dir():
        raise CheckpointError(
            f"components directory {config.components} does not exist; pass --components DIR"
        )
    return config
