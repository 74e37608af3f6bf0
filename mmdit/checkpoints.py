"""The on-disk format of training checkpoints: names, manifest, finding one, reading its files.

The trainer writes this layout (training/checkpoint.py: DeepSpeed's save, atomic publication,
retention) and everything else reads it (sampling, evaluation, export, initialising a run from
another, the launcher's checks); both take every name and the manifest's format from here, so
neither imports the other:

    RUN/checkpoints/step_00001000/
        ds/                          DeepSpeed ZeRO-3 shards (model, optimizer), one set per rank
        universal/                   made once when a run resumes on another world size
                                     (built as .universal.tmp, mmdit.atomic_file.atomic_path)
        ema_rank_*_of_*.safetensors  the EMA, one slice per rank
        client_rank_00000.json       per-rank trainer state: step, data position, RNG, counters
        config.yaml                  the resolved run config (data, never a pickled object)
        manifest.json                written last: every file's size and CRC-32, the world size
    RUN/checkpoints/latest           name of the newest published checkpoint
    RUN/checkpoints/.tmp_step_*      a checkpoint being written (ignored, removed on start)

A checkpoint is published once its manifest exists; one without is not a checkpoint.

Naming one (`resolve_checkpoint`):
  RUN                 newest published checkpoint of a run (RUN/checkpoints/latest)
  RUN:STEP, RUN/STEP  step STEP of that run (RUN/checkpoints/step_<8 digits>)
  .../step_00012000   any published checkpoint directory (one with manifest.json)

Its weights: `ema_state_dict` reads the EMA (safetensors); `zero_state_dict` consolidates the
trained weights from the ZeRO-3 shards with DeepSpeed's checkpoint reader (CPU, any world size,
no process group). Turning those into a complete MMDiT, and reading exported files, is
mmdit/weights.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from mmdit.atomic_file import write_atomic
from mmdit.model import MMDiTConfig

CHECKPOINTS = "checkpoints"  # RUN/checkpoints/
STEP_DIR = re.compile(r"^step_(\d{8,})$")
LATEST = "latest"
TMP_PREFIX = ".tmp_"  # a step directory being written
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CONFIG_FILE = "config.yaml"
DS_TAG = "ds"
UNIVERSAL_TAG = "universal"
EMA_SHARD_PATTERN = "ema_rank_{rank:05d}_of_{world:05d}.safetensors"
EMA_SHARD_GLOB = "ema_rank_*_of_*.safetensors"
# mmdit-export --format safetensors keeps the model config as JSON under this metadata key.
CONFIG_META_KEY = "mmdit_config"


class CheckpointError(Exception):
    """A problem with the user's input: a checkpoint not found, damaged or unreadable."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def ema_shard_name(rank: int, world: int) -> str:
    return EMA_SHARD_PATTERN.format(rank=rank, world=world)


def client_file_name(rank: int) -> str:
    return f"client_rank_{rank:05d}.json"


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


def crc32_file(path: Path, chunk: int = 8 << 20) -> int:
    """The checksum the manifest records for a file."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def write_manifest(directory: Path, step: int, world_size: int, files: dict[str, dict]) -> None:
    """`files`: relative path -> {"size": bytes, "crc32": crc32_file(path)}."""
    manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": world_size, "files": files}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(step_dir: str | os.PathLike) -> dict:
    return json.loads((Path(step_dir) / MANIFEST).read_text())


def check_sizes(step_dir: Path, wanted: Callable[[str], bool]) -> None:
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


# --------------------------------------------------------------------------------------------
# Finding a published checkpoint
# --------------------------------------------------------------------------------------------


def _checkpoints_root(path: Path) -> Path | None:
    if checkpoints_dir(path).is_dir():
        return checkpoints_dir(path)
    if path.name == CHECKPOINTS and path.is_dir():
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
            f"{checkpoints_dir(path)}/) nor a checkpoint directory (looked for "
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
        raise CheckpointError(f"{run_dir} is not a run directory (no {CHECKPOINTS}/ in it)")
    return [root / step_dir_name(s) for s in available_steps(root)]


# --------------------------------------------------------------------------------------------
# Reading a checkpoint's config and weights
# --------------------------------------------------------------------------------------------


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
    # The one import of DeepSpeed below the trainer (see pyproject.toml's import contracts):
    # its reader is the one maintained reader of ZeRO-3 files, and it needs no process group.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed prints progress on stdout; keep stdout for what our commands report.
    with contextlib.redirect_stdout(sys.stderr):
        sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG))
    return sd


def frozen_from_module_state(step_dir: Path, sd: dict[str, torch.Tensor]) -> None:
    """DeepSpeed's reader rebuilds frozen parameters (a LoRA run's base) from ZeRO-2/3's
    fragments only; under ZeRO-1 they are in the module state it saves whole (same trust
    caveat as zero_state_dict)."""
    module_file = step_dir / DS_TAG / "mp_rank_00_model_states.pt"
    if module_file.is_file():
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        sd.update({k: v.float() for k, v in module.items() if k not in sd and v.numel()})
