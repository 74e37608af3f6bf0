"""MMDiT weights from whatever names them: a training run or checkpoint, or an exported file.

Apart from mmdit/checkpoints.py (the on-disk format of training checkpoints and the readers of
their files) because this is what the readers' results become: a complete MMDiT state dict
checked against its config, with a LoRA run's adapters merged, whatever the source.

Weight sources (`load_weights`):
  RUN                 newest published checkpoint of a run (RUN/checkpoints/latest)
  RUN:STEP, RUN/STEP  step STEP of that run (RUN/checkpoints/step_<8 digits>)
  .../step_00012000   any published checkpoint directory (one with manifest.json)
  DIR                 a diffusers SD3Transformer2DModel folder, or a pipeline folder with
                      transformer/ (mmdit-export --format diffusers)
  FILE.safetensors    mmdit-export --format safetensors (config in the metadata) or an SD3
                      single file (model.diffusion_model.* names, architecture read off the
                      shapes)
For training checkpoints, `ema=True` reads the EMA; otherwise the trained weights are
consolidated from the ZeRO-3 shards with DeepSpeed's checkpoint reader (CPU, any world size,
no process group). Exported files hold one set of weights, so `ema` does not apply to them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit.checkpoints import (
    CONFIG_META_KEY,
    DS_TAG,
    MANIFEST,
    CheckpointError,
    check_sizes,
    ema_state_dict,
    frozen_from_module_state,
    is_training_checkpoint,
    read_manifest,
    read_model_config,
    read_run_config,
    resolve_checkpoint,
    zero_state_dict,
)
from mmdit.lora import Lora
from mmdit.model import MMDiT, MMDiTConfig


@dataclass(frozen=True)
class Weights:
    """A complete MMDiT state dict and where it came from."""

    config: MMDiTConfig
    state_dict: dict[str, torch.Tensor]
    source: str  # what was read, for tables and logs
    kind: str  # "checkpoint", "diffusers", "sd3", "mmdit-safetensors"
    weights: str  # "raw", "ema", or "exported"
    step: int | None  # training step when known
    run_dir: Path | None  # for training checkpoints

    def model(self, device: torch.device | str = "cpu", dtype=torch.float32) -> MMDiT:
        """An MMDiT in eval mode holding these weights."""
        model = MMDiT(self.config, initialize=False)
        model.load_state_dict(self.state_dict)
        return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------
# A complete state dict from a training checkpoint
# --------------------------------------------------------------------------------------------


def complete_state_dict(
    state_dict: dict[str, torch.Tensor], config: MMDiTConfig, source: str
) -> dict[str, torch.Tensor]:
    """Check names and shapes against MMDiT(config) and add missing buffers (pos_embed: the EMA
    keeps parameters only) from a freshly built model."""
    from mmdit.convert import check_state_dict

    with torch.device("meta"):
        fresh = MMDiT(config, initialize=False)
    expected = fresh.state_dict()
    buffers = {name for name, _ in fresh.named_buffers() if name in expected}
    missing = [k for k in expected if k not in state_dict]
    # Buffers may be absent (added below); every parameter must be there with its shape.
    required = {k: v.shape for k, v in expected.items() if k not in buffers or k in state_dict}
    try:
        check_state_dict(state_dict, required, f"model for {source}'s config.yaml ({config})")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not missing:
        return dict(state_dict)
    # Materialise only the buffers (parameters stay on the meta device) and let the model
    # recompute them; a buffer it does not recompute stays NaN and falls back to a CPU build.
    for module in fresh.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = torch.full(buf.shape, float("nan"), dtype=buf.dtype)
    fresh.initialize_weights(parts=[])
    filled = {k: v for k, v in fresh.state_dict().items() if k in missing}
    if any(v.is_floating_point() and v.isnan().any() for v in filled.values()):
        cpu_model = MMDiT(config, initialize=False)
        filled = {k: v for k, v in cpu_model.state_dict().items() if k in missing}
    out = dict(state_dict)
    out.update({k: v.detach().clone() for k, v in filled.items()})
    return {k: out[k] for k in expected}


def lora_scale_of(step_dir: str | os.PathLike) -> float | None:
    """The LoRA scale (alpha / rank) of a LoRA fine-tuning checkpoint (lora.rank > 0 in its
    config), None for any other."""
    from mmdit.lora import scale

    section = read_run_config(step_dir).get("lora") or {}
    rank = int(section.get("rank", 0))
    return scale(rank, float(section.get("alpha", 0.0))) if rank else None


def load_checkpoint_lora(
    step_dir: str | os.PathLike, ema: bool = False
) -> tuple[MMDiTConfig, dict[str, torch.Tensor], Lora, float]:
    """(model config, complete base state dict, LoRA per module, scale) of a LoRA fine-tuning
    checkpoint. The frozen base weights come from the ZeRO shards (DeepSpeed keeps frozen
    parameters there, in the run's precision), the adapters from the ZeRO shards or, with
    `ema`, from the EMA (which holds the adapters only: the base never changes)."""
    from mmdit import lora

    step_dir = Path(step_dir)
    scale = lora_scale_of(step_dir)
    if scale is None:
        raise CheckpointError(f"checkpoint {step_dir} is not a LoRA run (its lora.rank is 0)")
    config = read_model_config(step_dir)
    check_sizes(step_dir, lambda rel: rel.startswith(f"{DS_TAG}/"))
    sd = zero_state_dict(step_dir)
    if not any(k.endswith(".base_layer.weight") for k in sd):
        frozen_from_module_state(step_dir, sd)
    if ema:
        check_sizes(step_dir, lambda rel: rel.startswith("ema_rank_"))
        averaged = ema_state_dict(step_dir)
        unknown = sorted(set(averaged) - set(sd))
        if unknown:
            raise CheckpointError(f"EMA in {step_dir} has {unknown[:3]}, which the model lacks")
        sd.update(averaged)
    base, adapters = lora.split(sd)
    base = {k: v.float() for k, v in base.items()}
    return config, complete_state_dict(base, config, f"LoRA base in {step_dir}"), adapters, scale


def load_checkpoint_weights(
    step_dir: str | os.PathLike, ema: bool = False
) -> tuple[MMDiTConfig, dict[str, torch.Tensor]]:
    """(model config, complete MMDiT state dict) of a published checkpoint directory; for a
    LoRA fine-tuning run, the base weights with the LoRA merged (what the run's model
    computes)."""
    from mmdit import lora

    step_dir = Path(step_dir)
    if lora_scale_of(step_dir) is not None:
        config, base, adapters, scale = load_checkpoint_lora(step_dir, ema=ema)
        return config, lora.merge(base, adapters, scale)
    config = read_model_config(step_dir)
    if ema:
        check_sizes(step_dir, lambda rel: rel.startswith("ema_rank_"))
        sd = ema_state_dict(step_dir)
        source = f"EMA in {step_dir}"
    else:
        check_sizes(step_dir, lambda rel: rel.startswith(f"{DS_TAG}/"))
        sd = zero_state_dict(step_dir)
        source = f"ZeRO checkpoint {step_dir / DS_TAG}"
    return config, complete_state_dict(sd, config, source)


# --------------------------------------------------------------------------------------------
# Exported weights
# --------------------------------------------------------------------------------------------


def read_mmdit_safetensors(path: str | os.PathLike) -> tuple[MMDiTConfig, dict[str, torch.Tensor]]:
    """Read back an `mmdit-export --format safetensors` file: (MMDiTConfig, state dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmdit.typed_config import from_dict

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_META_KEY not in meta:
        raise CheckpointError(
            f"{path} has no '{CONFIG_META_KEY}' metadata; not an mmdit-export file"
        )
    config = from_dict(MMDiTConfig, json.loads(meta[CONFIG_META_KEY]), source=str(path))
    return config.portable(), load_file(str(path))


def _load_exported_file(path: Path) -> tuple[str, MMDiTConfig, dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmdit.convert import SINGLE_FILE_PREFIX, from_sd3_single_file
    from mmdit.typed_config import from_dict

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        single_file = any(k.startswith(SINGLE_FILE_PREFIX) for k in f.keys())  # noqa: SIM118
    if not single_file:
        return "mmdit-safetensors", *read_mmdit_safetensors(path)
    overrides = {}
    if CONFIG_META_KEY in meta:
        # Our sd3 exports record the config: the head count and sample_size are not in the
        # shapes of a single file.
        recorded = from_dict(MMDiTConfig, json.loads(meta[CONFIG_META_KEY]), source=str(path))
        overrides = {"num_heads": recorded.num_heads, "sample_size": recorded.sample_size}
    try:
        config, sd = from_sd3_single_file(load_file(str(path)), **overrides)
    except ValueError as e:
        raise CheckpointError(f"{path}: not a readable SD3 single file: {e}") from None
    return "sd3", config, sd


def load_weights(spec: str | os.PathLike, *, ema: bool = False) -> Weights:
    """The MMDiT weights `spec` names; see the module docstring for the accepted forms."""
    from mmdit.convert import load_diffusers

    path = Path(spec)
    if is_training_checkpoint(spec):
        step_dir = resolve_checkpoint(spec)
        config, sd = load_checkpoint_weights(step_dir, ema=ema)
        return Weights(
            config,
            sd,
            source=str(step_dir),
            kind="checkpoint",
            weights="ema" if ema else "raw",
            step=int(read_manifest(step_dir)["step"]),
            run_dir=step_dir.parent.parent,
        )
    if ema:
        raise CheckpointError(
            f"{spec}: EMA weights can only be chosen for training checkpoints (RUN[:STEP]); "
            "an exported file holds one set of weights (export with --ema to get the EMA)"
        )
    if path.is_dir():
        try:
            config, sd = load_diffusers(path)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{spec}: not a diffusers transformer folder: {e}") from None
        kind = "diffusers"
    elif path.is_file() and path.suffix == ".safetensors":
        kind, config, sd = _load_exported_file(path)
    else:
        raise CheckpointError(
            f"{spec}: not found as a run (RUN/checkpoints/), a checkpoint directory (with "
            f"{MANIFEST}), a diffusers folder or a .safetensors file"
        )
    sd = complete_state_dict(sd, config, str(spec))
    return Weights(config, sd, str(path), kind, "exported", step=None, run_dir=None)
