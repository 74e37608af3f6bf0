"""Finding and reading MMDiT weights: training checkpoints and the files people export.

The read side of the checkpoint layout lives here (the trainer writes it, see
training/checkpoint.py), so sampling, evaluation and export read weights without importing the
trainer:

    RUN/checkpoints/step_00001000/
        ds/                          DeepSpeed ZeRO-3 shards of the trained weights
        ema_rank_*_of_*.safetensors  the EMA, one slice per rank
        config.yaml                  the resolved run config
        manifest.json                written last: files, sizes, CRCs, step, world size
    RUN/checkpoints/latest           name of the newest published checkpoint

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

import contextlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit.lora import Lora
from mmdit.model import MMDiT, MMDiTConfig

MANIFEST = "manifest.json"
LATEST = "latest"
CONFIG_FILE = "config.yaml"
DS_TAG = "ds"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
EMA_SHARD_PATTERN = "ema_rank_{rank:05d}_of_{world:05d}.safetensors"
EMA_SHARD_GLOB = "ema_rank_*_of_*.safetensors"
# mmdit-export --format safetensors keeps the model config as JSON under this metadata key.
CONFIG_META_KEY = "mmdit_config"


class CheckpointError(Exception):
    """A problem with the user's input: a checkpoint not found, damaged or unreadable."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def ema_shard_name(rank: int, world: int) -> str:
    return EMA_SHARD_PATTERN.format(rank=rank, world=world)


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
# Finding a published checkpoint
# --------------------------------------------------------------------------------------------


def _checkpoints_root(path: Path) -> Path | None:
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.name == "checkpoints" and path.is_dir():
        return path
    return None


def available_steps(root: Path) -> list[int]:
    """Steps of the published checkpoints (those with a manifest) under RUN/checkpoints."""
    if not root.is_dir():
        return []
    return sorted(
        int(m.group(1))
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()
    )


def _steps_text(root: Path) -> str:
    steps = available_steps(root)
    return ", ".join(map(str, steps)) if steps else "none"


def _run_and_step(text: str) -> tuple[Path, int | None]:
    """`RUN:STEP`, `RUN/STEP` and `RUN/step_N` -> (RUN, STEP); anything else -> (path, None)."""
    path = Path(text)
    if _checkpoints_root(path) is None:
        colon = re.fullmatch(r"(.+):(\d+)", text)
        name = re.fullmatch(r"(?:step_)?(\d+)", path.name)
        if colon:
            return Path(colon.group(1)), int(colon.group(2))
        if name:
            return path.parent, int(name.group(1))
    return path, None


def is_training_checkpoint(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a run or a checkpoint directory (rather than an exported file or
    a diffusers folder)."""
    if (Path(spec) / MANIFEST).is_file():
        return True
    return _checkpoints_root(_run_and_step(str(spec))[0]) is not None


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """The published checkpoint directory (RUN/checkpoints/step_XXXXXXXX) that `spec` names:
    RUN, RUN:STEP, RUN/STEP, RUN/step_N, RUN/checkpoints/step_N or any directory with a
    manifest. Unpublished (incomplete) checkpoints do not count."""
    text = str(spec)
    if (Path(text) / MANIFEST).is_file():
        return Path(text)
    path, step = _run_and_step(text)
    root = _checkpoints_root(path)
    if root is None:
        raise CheckpointError(
            f"checkpoint {text}: found neither a run directory (looked for "
            f"{path / 'checkpoints'}/) nor a checkpoint directory (looked for "
            f"{Path(text) / MANIFEST}); pass RUN, RUN:STEP, RUN/STEP or RUN/checkpoints/step_N"
        )
    if step is None:
        latest = root / LATEST
        if not latest.is_file():
            raise CheckpointError(
                f"checkpoint {text}: {latest} does not exist (no checkpoint was published); "
                f"available steps in {root}: {_steps_text(root)}"
            )
        chosen = root / latest.read_text().strip()
        if not (chosen / MANIFEST).is_file():
            raise CheckpointError(
                f"checkpoint {text}: {latest} names {chosen.name}, which has no {MANIFEST}; "
                f"available steps in {root}: {_steps_text(root)}"
            )
        return chosen
    chosen = root / step_dir_name(step)
    if not (chosen / MANIFEST).is_file():
        why = f"{chosen} has no {MANIFEST} (incomplete)" if chosen.exists() else f"no {chosen}"
        raise CheckpointError(
            f"checkpoint {text}: no published checkpoint for step {step} ({why}); "
            f"available steps in {root}: {_steps_text(root)}"
        )
    return chosen


def run_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Every published checkpoint of a run, oldest first."""
    root = _checkpoints_root(Path(run_dir))
    if root is None:
        raise CheckpointError(f"{run_dir} is not a run directory (no checkpoints/ in it)")
    return [root / step_dir_name(s) for s in available_steps(root)]


def read_manifest(step_dir: str | os.PathLike) -> dict:
    return json.loads((Path(step_dir) / MANIFEST).read_text())


def check_sizes(step_dir: Path, wanted) -> None:
    """The files we are about to read exist with the sizes the manifest recorded."""
    manifest = read_manifest(step_dir)
    files = {rel: e for rel, e in manifest.get("files", {}).items() if wanted(rel)}
    if not files:
        raise CheckpointError(f"{step_dir}/{MANIFEST} lists none of the files to read")
    wrong = []
    for rel, entry in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            wrong.append(f"{rel} is missing")
        elif path.stat().st_size != entry["size"]:
            wrong.append(f"{rel} has {path.stat().st_size} bytes, manifest says {entry['size']}")
    if wrong:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: " + "; ".join(wrong[:5]))


def read_run_config(step_dir: str | os.PathLike) -> dict:
    """The checkpoint's resolved run config as plain data (sections model, data, train, ...);
    typed loading of the whole tree is the trainer's business."""
    import yaml

    path = Path(step_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {step_dir} has no {CONFIG_FILE}")
    return yaml.safe_load(path.read_text())


def read_model_config(step_dir: str | os.PathLike) -> MMDiTConfig:
    from mmdit.typed_config import from_dict

    path = Path(step_dir) / CONFIG_FILE
    section = read_run_config(step_dir).get("model")
    if not isinstance(section, Mapping):
        raise CheckpointError(f"{path} has no model section")
    return from_dict(MMDiTConfig, section, source=f"{path}: model").portable()


# --------------------------------------------------------------------------------------------
# Reading the weights of a training checkpoint
# --------------------------------------------------------------------------------------------


def ema_shard_files(directory: str | Path) -> list[Path]:
    files = sorted(Path(directory).glob(EMA_SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"no EMA shards ({EMA_SHARD_GLOB}) in {directory}")
    world = {f.stem.rsplit("_of_", 1)[1] for f in files}
    if len(world) != 1 or len(files) != int(next(iter(world))):
        raise ValueError(
            f"EMA shards in {directory} are incomplete or mixed: {[f.name for f in files]}"
        )
    return files


def ema_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The whole EMA as full fp32 tensors, from the per-rank pieces of any world size and ZeRO
    stage. Each file records where its piece of every parameter starts in the flattened tensor
    ("starts"; files without it hold ZeRO-3 slices: rank r's piece starts at r x its length);
    the pieces must tile every tensor exactly, ZeRO-3's padding past the end aside."""
    from safetensors import safe_open

    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    shapes: Mapping[str, list[int]] = {}
    for rank, path in enumerate(ema_shard_files(directory)):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            shapes = json.loads(meta["shapes"])
            starts = json.loads(meta["starts"]) if "starts" in meta else None
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_tensor(name)
                start = starts[name] if starts is not None else rank * t.numel()
                pieces.setdefault(name, []).append((start, t))
    out = {}
    for name, parts in pieces.items():
        shape = tuple(shapes[name])
        numel = int(torch.Size(shape).numel())
        flat = torch.empty(numel, dtype=torch.float32)
        end = 0
        # Empty pieces (ZeRO-1/2 ranks without this parameter) and ZeRO-3 slices made only of
        # padding (more ranks than elements) carry nothing.
        real = sorted(((s, t) for s, t in parts if t.numel() and s < numel), key=lambda p: p[0])
        for start, t in real:
            have = min(t.numel(), numel - start)
            if start != end:
                raise CheckpointError(
                    f"EMA shards in {directory}: the pieces of {name} do not tile it (a piece "
                    f"starts at {start}, expected {end}); the checkpoint is damaged"
                )
            flat[start : start + have] = t[:have]
            end = start + have
        if end != numel:
            raise CheckpointError(
                f"EMA shards in {directory} cover {end} of the {numel} elements of {name}; "
                "the checkpoint is damaged"
            )
        out[name] = flat.reshape(shape)
    return out


def zero_state_dict(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 trained weights from the ZeRO-3 shards in step_dir/ds (CPU, any world size).

    DeepSpeed's reader loads its shards with torch.load(weights_only=False): only read
    checkpoints you trust (the EMA path reads safetensors only)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed prints progress on stdout; keep stdout for what our commands report.
    with contextlib.redirect_stdout(sys.stderr):
        sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG))
    return sd


def _frozen_from_module_state(step_dir: Path, sd: dict[str, torch.Tensor]) -> None:
    """DeepSpeed's reader rebuilds frozen parameters (a LoRA run's base) from ZeRO-2/3's
    fragments only; under ZeRO-1 they are in the module state it saves whole (same trust
    caveat as zero_state_dict)."""
    module_file = step_dir / DS_TAG / "mp_rank_00_model_states.pt"
    if module_file.is_file():
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        sd.update({k: v.float() for k, v in module.items() if k not in sd and v.numel()})


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
        _frozen_from_module_state(step_dir, sd)
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
