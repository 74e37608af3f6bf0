"""`mmdit-export`: turn a training checkpoint into weights other tools load, on the CPU.

    mmdit-export --checkpoint runs/d24 --format diffusers --ema --dtype bf16 --out out/d24-diffusers
    mmdit-export --checkpoint runs/d24:12000 --format sd3 --out out/d24_step12000.safetensors
    mmdit-export --checkpoint runs/d24/checkpoints/step_00012000 --format safetensors --out w.st

Which checkpoint (--checkpoint):
  RUN                       the run directory (train.run_dir): its newest checkpoint, as named
                            by RUN/checkpoints/latest
  RUN:STEP or RUN/STEP      step STEP (an integer) of that run: RUN/checkpoints/step_<8 digits>
  RUN/step_00012000         the same (RUN/checkpoints/step_00012000 also works)
  .../step_00012000         any published checkpoint directory (one with manifest.json)
Only published checkpoints count (written completely, with manifest.json); the error for a
missing one lists the steps that exist.

Which weights: by default the trained weights, consolidated from the DeepSpeed ZeRO-3 shards
in ds/ (any number of ranks; no GPU or process group needed); with --ema the EMA of the
weights (ema_rank_*_of_*.safetensors). The model architecture comes from the checkpoint's
config.yaml.

Formats (--format):
  diffusers    a folder (config.json + diffusion_pytorch_model.safetensors) for
               diffusers.SD3Transformer2DModel.from_pretrained(OUT); put it in a pipeline
               folder as transformer/ to use it with StableDiffusion3Pipeline
  sd3          one .safetensors file with Stability's single-file names
               (model.diffusion_model.joint_blocks.N...), for tools that load SD3 single files
  safetensors  one .safetensors file with this repository's MMDiT state dict; its metadata
               holds the model config as JSON ("mmdit_config"); read it back with
               training.export.load_safetensors(OUT)

--dtype casts every floating-point tensor (default fp32, as trained). The output is written
to a temporary name next to OUT and moved into place at the end, so OUT is never half written;
an existing OUT is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit.model import MMDiT, MMDiTConfig
from training.checkpoint import DS_TAG, LATEST, MANIFEST, STEP_DIR, step_dir_name

FORMATS = ("diffusers", "sd3", "safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_META_KEY = "mmdit_config"


class ExportError(Exception):
    """A problem with the user's input (checkpoint not found, damaged, bad output path)."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[Path]
    step: int
    weights: str  # "raw" or "ema"
    dtype: str
    num_tensors: int
    num_params: int


# --------------------------------------------------------------------------------------------
# Finding the checkpoint
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


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """The published checkpoint directory (RUN/checkpoints/step_XXXXXXXX) that `spec` names;
    see the module docstring for the accepted forms."""
    text = str(spec)
    path = Path(text)
    step: int | None = None
    if (path / MANIFEST).is_file():
        return path
    if _checkpoints_root(path) is None:
        colon = re.fullmatch(r"(.+):(\d+)", text)
        name = re.fullmatch(r"(?:step_)?(\d+)", path.name)
        if colon:
            path, step = Path(colon.group(1)), int(colon.group(2))
        elif name:
            path, step = path.parent, int(name.group(1))
    root = _checkpoints_root(path)
    if root is None:
        raise ExportError(
            f"--checkpoint {text}: found neither a run directory (looked for "
            f"{path / 'checkpoints'}/) nor a checkpoint directory (looked for "
            f"{Path(text) / MANIFEST}); pass RUN, RUN:STEP, RUN/STEP or RUN/checkpoints/step_N"
        )
    if step is None:
        latest = root / LATEST
        if not latest.is_file():
            raise ExportError(
                f"--checkpoint {text}: {latest} does not exist (no checkpoint was published); "
                f"available steps in {root}: {_steps_text(root)}"
            )
        chosen = root / latest.read_text().strip()
        if not (chosen / MANIFEST).is_file():
            raise ExportError(
                f"--checkpoint {text}: {latest} names {chosen.name}, which has no {MANIFEST}; "
                f"available steps in {root}: {_steps_text(root)}"
            )
        return chosen
    chosen = root / step_dir_name(step)
    if not (chosen / MANIFEST).is_file():
        why = f"{chosen} has no {MANIFEST} (incomplete)" if chosen.exists() else f"no {chosen}"
        raise ExportError(
            f"--checkpoint {text}: no published checkpoint for step {step} ({why}); "
            f"available steps in {root}: {_steps_text(root)}"
        )
    return chosen


def _check_sizes(step_dir: Path, wanted) -> None:
    """The files we are about to read exist with the sizes the manifest recorded."""
    manifest = json.loads((step_dir / MANIFEST).read_text())
    files = {rel: e for rel, e in manifest.get("files", {}).items() if wanted(rel)}
    if not files:
        raise ExportError(f"{step_dir}/{MANIFEST} lists none of the files an export needs")
    wrong = []
    for rel, entry in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            wrong.append(f"{rel} is missing")
        elif path.stat().st_size != entry["size"]:
            wrong.append(f"{rel} has {path.stat().st_size} bytes, manifest says {entry['size']}")
    if wrong:
        raise ExportError(f"checkpoint {step_dir} is damaged: " + "; ".join(wrong[:5]))


# --------------------------------------------------------------------------------------------
# Reading the weights
# --------------------------------------------------------------------------------------------


def load_run_config(step_dir: str | os.PathLike):
    from mmdit.typed_config import load
    from training.config import RunConfig

    path = Path(step_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"checkpoint {step_dir} has no config.yaml")
    return load(RunConfig, path)


def consolidated_state_dict(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the ZeRO-3 shards in step_dir/ds (CPU, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed prints progress on stdout; keep stdout for what this command reports.
    with contextlib.redirect_stdout(sys.stderr):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG)
    return dict(sd)


def complete_state_dict(
    state_dict: dict[str, torch.Tensor], config: MMDiTConfig, source: str
) -> dict[str, torch.Tensor]:
    """Check names and shapes against MMDiT(config) and add missing buffers (pos_embed: the EMA
    keeps parameters only) from a freshly built model."""
    with torch.device("meta"):
        fresh = MMDiT(config, initialize=False)
    expected = fresh.state_dict()
    buffers = {name for name, _ in fresh.named_buffers() if name in expected}
    missing = [k for k in expected if k not in state_dict]
    # Buffers may be absent (added below); every parameter must be there with its shape.
    required = {k: v.shape for k, v in expected.items() if k not in buffers or k in state_dict}
    from mmdit.convert import check_state_dict

    try:
        check_state_dict(state_dict, required, f"model for {source}'s config.yaml ({config})")
    except ValueError as e:
        raise ExportError(str(e)) from None
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


def load_checkpoint_weights(
    step_dir: str | os.PathLike, ema: bool = False
) -> tuple[MMDiTConfig, dict[str, torch.Tensor]]:
    """(model config, complete MMDiT state dict) of a published checkpoint directory."""
    step_dir = Path(step_dir)
    config = load_run_config(step_dir).model
    if ema:
        from training.ema import full_state_dict

        _check_sizes(step_dir, lambda rel: rel.startswith("ema_rank_"))
        sd = full_state_dict(step_dir)
        source = f"EMA in {step_dir}"
    else:
        _check_sizes(step_dir, lambda rel: rel.startswith(f"{DS_TAG}/"))
        sd = consolidated_state_dict(step_dir)
        source = f"ZeRO checkpoint {step_dir / DS_TAG}"
    return config, complete_state_dict(sd, config, source)


def cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def load_safetensors(path: str | os.PathLike) -> tuple[MMDiTConfig, dict[str, torch.Tensor]]:
    """Read back a `--format safetensors` export: (MMDiTConfig, state dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmdit.typed_config import from_dict

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_META_KEY not in meta:
        raise ValueError(f"{path} has no '{CONFIG_META_KEY}' metadata; not an mmdit-export file")
    config = from_dict(MMDiTConfig, json.loads(meta[CONFIG_META_KEY]), source=str(path))
    return config, load_file(str(path))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _tmp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _publish(tmp: Path, out: Path) -> None:
    """Move tmp to out with os.replace; a directory replacing an existing out is moved over
    the old one in two renames (the old one is deleted afterwards)."""
    if out.exists() and (tmp.is_dir() or out.is_dir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)
    else:
        os.replace(tmp, out)


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata)


def _count_tensors(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return len(list(f.keys()))


def export(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    ema: bool = False,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> ExportResult:
    """Export the checkpoint `checkpoint` names (see resolve_checkpoint) to `out`."""
    from mmdit import convert
    from mmdit.typed_config import dumps_json

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} exists; pass --overwrite to replace it")
    step_dir = resolve_checkpoint(checkpoint)
    step = json.loads((step_dir / MANIFEST).read_text())["step"]
    config, sd = load_checkpoint_weights(step_dir, ema=ema)
    sd = cast(sd, DTYPES[dtype])
    weights = "ema" if ema else "raw"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(out)
    _remove(tmp)
    meta = {
        "format": "pt",
        CONFIG_META_KEY: dumps_json(config),
        "mmdit_step": str(step),
        "mmdit_weights": weights,
        "mmdit_source": str(step_dir.resolve()),
    }
    try:
        if fmt == "diffusers":
            convert.save_diffusers(tmp, sd, config)
            files = [out / p.name for p in sorted(tmp.iterdir())]
            num_tensors = _count_tensors(tmp / convert.DIFFUSERS_WEIGHTS)
        elif fmt == "sd3":
            tensors = convert.to_sd3_single_file(sd, config)
            _save_file(tensors, tmp, meta)
            files, num_tensors = [out], len(tensors)
        else:
            _save_file(sd, tmp, meta)
            files, num_tensors = [out], len(sd)
        _publish(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    with torch.device("meta"):
        num_params = sum(p.numel() for p in MMDiT(config, initialize=False).parameters())
    return ExportResult(out, files, step, weights, dtype, num_tensors, num_params)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="mmdit-export",
        description=parts[0],
        epilog="\n\n".join(parts[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN[:STEP]",
        help="run directory (newest checkpoint), RUN:STEP / RUN/STEP, or a checkpoint "
        "directory RUN/checkpoints/step_XXXXXXXX",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--out", required=True, metavar="PATH", help="folder (diffusers) or file")
    parser.add_argument(
        "--ema", action="store_true", help="export the EMA weights instead of the trained ones"
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=tuple(DTYPES), help="floating-point dtype (fp32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = export(
            args.checkpoint,
            args.format,
            args.out,
            ema=args.ema,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except ExportError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(
        f"exported step {result.step} ({result.weights} weights, {result.num_params:,} "
        f"parameters, {result.num_tensors} tensors, {result.dtype}) as {args.format} to "
        f"{result.out}"
    )
    for path in result.files:
        print(f"  wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
