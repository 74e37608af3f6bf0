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
               eval.checkpoints.read_mmdit_safetensors(OUT)

--dtype casts every floating-point tensor (default fp32, as trained). The output is written
to a temporary name next to OUT and moved into place at the end, so OUT is never half written;
an existing OUT is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.checkpoints import (
    CONFIG_META_KEY,
    MANIFEST,
    CheckpointError,
    load_checkpoint_weights,
    resolve_checkpoint,
)
from mmdit.model import MMDiT

FORMATS = ("diffusers", "sd3", "safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(CheckpointError):
    """A problem with the user's input (bad format, dtype or output path)."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[Path]
    step: int
    weights: str  # "raw" or "ema"
    dtype: str
    num_tensors: int
    num_params: int


def cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


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
    except CheckpointError as e:
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
