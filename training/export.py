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
               mmdit.weights.read_mmdit_safetensors(OUT)

  diffusers-pipeline
               a folder that diffusers.StableDiffusion3Pipeline.from_pretrained(OUT) loads on its
               own: transformer/ (as --format diffusers), scheduler/ (FlowMatchEuler with the
               run's sampling shift, as mmdit-sample), the text encoders, tokenizers and VAE
               from the run's conditioning.components or --components DIR (copied; --link
               hardlink/symlink),
               model_index.json and a model card README.md (config, data, steps, FLOPs, eval)
  diffusers-lora
               for a LoRA run (lora.rank > 0): OUT/pytorch_lora_weights.safetensors, the adapters
               alone in diffusers' names with alpha / rank folded into lora_B, for
               StableDiffusion3Pipeline.load_lora_weights(OUT) on the base model's pipeline

LoRA runs: their checkpoints hold the frozen base and the adapters apart. --merge-lora writes
base + (alpha / rank) * B @ A as ordinary weights in any of the first four formats (required
there: a LoRA run exported without it would silently lose its adapters); --format
diffusers-lora writes the adapters alone. With --ema the adapters are the EMA's.

    mmdit-export --checkpoint runs/lora --format diffusers-lora --out out/lora
    mmdit-export --checkpoint runs/lora --format diffusers --merge-lora --out out/merged
    mmdit-export --checkpoint runs/d24 --format diffusers-pipeline --ema --out out/d24-pipeline

--dtype casts every floating-point tensor (default fp32, as trained). The output is written
to a temporary name next to OUT and moved into place at the end, so OUT is never half written;
an existing OUT is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit.atomic_file import atomic_path
from mmdit.checkpoints import (
    CONFIG_META_KEY,
    MANIFEST,
    CheckpointError,
    read_run_config,
    resolve_checkpoint,
)
from mmdit.conditioning.components import ComponentError
from mmdit.model import MMDiT
from mmdit.weights import load_checkpoint_lora, load_checkpoint_weights, lora_scale_of

FORMATS = ("diffusers", "sd3", "safetensors", "diffusers-pipeline", "diffusers-lora")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
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
    merge_lora: bool = False,
    components: str | os.PathLike | None = None,
    link: str = "copy",
) -> ExportResult:
    """Export the checkpoint `checkpoint` names (see resolve_checkpoint) to `out`."""
    from mmdit import convert
    from mmdit import lora as lora_weights
    from mmdit.typed_config import dumps_json

    _check_options(fmt, dtype, link)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} exists; pass --overwrite to replace it")
    step_dir = resolve_checkpoint(checkpoint)
    step = json.loads((step_dir / MANIFEST).read_text())["step"]
    scale = lora_scale_of(step_dir)
    _check_lora_use(step_dir, scale is not None, fmt, merge_lora)
    lora = None
    if scale is None:
        config, sd = load_checkpoint_weights(step_dir, ema=ema)
    else:
        config, base, lora, scale = load_checkpoint_lora(step_dir, ema=ema)
        sd = lora_weights.merge(base, lora, scale)
    sd = cast(sd, DTYPES[dtype])
    weights = "ema" if ema else "raw"

    meta = {
        "format": "pt",
        CONFIG_META_KEY: dumps_json(config),
        "mmdit_step": str(step),
        "mmdit_weights": weights,
        "mmdit_source": str(step_dir.resolve()),
    }
    # Written under a temporary name and renamed over out only when complete.
    with atomic_path(out) as tmp:
        if fmt == "diffusers":
            convert.save_diffusers(tmp, sd, config)
            files = [out / p.name for p in sorted(tmp.iterdir())]
            num_tensors = _count_tensors(tmp / convert.DIFFUSERS_WEIGHTS)
        elif fmt == "sd3":
            tensors = convert.to_sd3_single_file(sd, config)
            _save_file(tensors, tmp, meta)
            files, num_tensors = [out], len(tensors)
        elif fmt == "safetensors":
            _save_file(sd, tmp, meta)
            files, num_tensors = [out], len(sd)
        elif fmt == "diffusers-pipeline":
            from training.pipeline_export import model_card, write_pipeline

            card = model_card(step_dir, config, weights, merged=lora is not None)
            run_config = read_run_config(step_dir)
            write_pipeline(tmp, sd, config, run_config, card, components, link)
            files = [out / p.name for p in sorted(tmp.iterdir())]
            num_tensors = _count_tensors(tmp / "transformer" / convert.DIFFUSERS_WEIGHTS)
        else:  # diffusers-lora
            tensors = convert.to_diffusers_lora(lora_weights.scaled(lora, scale), config)
            tensors = cast(tensors, DTYPES[dtype])
            rank = next(iter(lora.values()))[0].shape[0]
            meta.update({"mmdit_lora_rank": str(rank), "mmdit_lora_scale": repr(scale)})
            tmp.mkdir()
            _save_file(tensors, tmp / LORA_WEIGHTS, meta)
            files, num_tensors = [out / LORA_WEIGHTS], len(tensors)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in MMDiT(config, initialize=False).parameters())
    return ExportResult(out, files, step, weights, dtype, num_tensors, num_params)


def _check_options(fmt: str, dtype: str, link: str) -> None:
    from training.pipeline_export import LINKS

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if link not in LINKS:
        raise ExportError(f"--link {link!r}: expected one of {', '.join(LINKS)}")


def _check_lora_use(step_dir: Path, has_lora: bool, fmt: str, merge_lora: bool) -> None:
    """A LoRA run exports merged (--merge-lora) or as adapters; any other run neither."""
    if not has_lora and (merge_lora or fmt == "diffusers-lora"):
        what = "--merge-lora" if merge_lora else "--format diffusers-lora"
        raise ExportError(
            f"{what}: checkpoint {step_dir} has no LoRA (its lora.rank is 0); export its "
            "weights without it"
        )
    if has_lora and fmt != "diffusers-lora" and not merge_lora:
        raise ExportError(
            f"checkpoint {step_dir} is a LoRA run: pass --merge-lora to write base + LoRA "
            "merged weights, or --format diffusers-lora to write the adapters alone"
        )


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
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA runs: write base + LoRA merged weights (formats diffusers, sd3, "
        "safetensors, diffusers-pipeline)",
    )
    parser.add_argument(
        "--components",
        metavar="DIR",
        help="diffusers-pipeline: the SD3 diffusers folder with the text encoders, tokenizers "
        "and VAE (default: the run's conditioning.components)",
    )
    parser.add_argument(
        "--link",
        default="copy",
        choices=("copy", "hardlink", "symlink"),
        help="diffusers-pipeline: copy the frozen components (default), or hard- or symlink them",
    )
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
            merge_lora=args.merge_lora,
            components=args.components,
            link=args.link,
        )
    except (CheckpointError, ComponentError) as e:
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
