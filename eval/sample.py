"""`mmdit-sample`: text -> images with the SD3 sampler, from a checkpoint or exported weights.

    mmdit-sample --checkpoint runs/d24 --ema --components /models/sd3 \\
        --prompt "a photo of a cat" --prompt "a red bus" --out cats.png
    mmdit-sample --checkpoint runs/d24:12000 --components /models/sd3 --prompts prompts.txt \\
        --size 768x512 --steps 28 --cfg 4.5 --seed 7 --out samples/

Weights (--checkpoint): RUN (newest checkpoint), RUN:STEP, RUN/checkpoints/step_N, a diffusers
folder (mmdit-export --format diffusers), or a .safetensors file (mmdit-export --format sd3 or
safetensors; SD3 single files from elsewhere work too). --ema picks the EMA of a training
checkpoint.

Sampling: Euler on the rectified-flow ODE over diffusers' FlowMatchEulerDiscreteScheduler grid,
classifier-free guidance against --negative-prompt (default the empty prompt). The shift
defaults to the training run's (its eval.shift, else train.shift with SD3's sqrt(h*w)/base
rule at --size when train.shift_base_resolution is set); exported weights use SD3's 3.0.
Prompt i uses noise seeded with SEED + i, so an image does not depend on the batch size or on
the other prompts. --size is any WxH with sides multiple of 16.

Output (--out): a .png path writes one grid of all images; any other path is a directory with
one PNG per prompt (00000.png, ...) and prompts.jsonl (index, prompt, seed, settings).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from PIL import Image

from eval.loading import conditioning_of, pick_device, run_config_of
from mmdit.atomic_file import write_atomic
from mmdit.checkpoints import CheckpointError
from mmdit.conditioning import DTYPES, load_text_encoders, load_vae
from mmdit.flow import sampling_shift
from mmdit.sampling import encode_prompts, image_grid, sample_encoded, save_png, to_uint8
from mmdit.weights import load_weights

log = logging.getLogger("mmdit-sample")


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (or one number for a square) -> (width, height)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512")


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise CheckpointError(f"--prompts {path}: no such file (one prompt per line)")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise CheckpointError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return out


def build_parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="mmdit-sample",
        description=parts[0],
        epilog="\n\n".join(parts[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="weights to sample")
    parser.add_argument("--ema", action="store_true", help="EMA weights of a training checkpoint")
    parser.add_argument(
        "--components",
        metavar="DIR",
        help="SD3-layout directory with vae/, text_encoder*/, tokenizer*/ (default: the "
        "checkpoint's conditioning.components)",
    )
    parser.add_argument("--prompt", action="append", metavar="TEXT", help="repeatable")
    parser.add_argument("--prompts", metavar="FILE", help="one prompt per line")
    parser.add_argument("--negative-prompt", default="", metavar="TEXT")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg", type=float, default=4.5, help="guidance scale (1 = none)")
    parser.add_argument(
        "--shift",
        type=float,
        default=None,
        help="sigma schedule shift (default: the training run's at --size; 3.0 for exports)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=parse_size, default=None, metavar="WxH")
    parser.add_argument("--out", required=True, metavar="GRID.png|DIR")
    parser.add_argument("--nrow", type=int, default=None, help="grid images per row")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="model dtype")
    return parser


def default_size(weights) -> tuple[int, int]:
    """The training resolution, else the model's native size (sample_size latents x 8)."""
    resolution = (run_config_of(weights).get("data") or {}).get("resolution")
    side = int(resolution) if resolution else weights.config.sample_size * 8
    return side, side


def run(args: argparse.Namespace) -> list[Path]:
    device = pick_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    prompts = read_prompts(args.prompt, args.prompts)
    weights = load_weights(args.checkpoint, ema=args.ema)
    width, height = args.size or default_size(weights)
    cond = conditioning_of(weights, args.components, dtype_name)
    args.shift = sampling_shift(run_config_of(weights), height, width, args.shift)
    log.info(
        "%s (%s weights, step %s): %d prompts at %dx%d, %d steps, cfg %.2f, shift %.2f",
        weights.source,
        weights.weights,
        weights.step,
        len(prompts),
        width,
        height,
        args.steps,
        args.cfg,
        args.shift,
    )
    model = weights.model(device, DTYPES[dtype_name])
    text_encoders = load_text_encoders(cond, device)
    encoded = encode_prompts(text_encoders, prompts, args.negative_prompt)
    del text_encoders
    vae = load_vae(cond, device)
    start = time.monotonic()
    images = sample_encoded(
        model,
        vae,
        encoded,
        height=height,
        width=width,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg,
        shift=args.shift,
        batch_size=args.batch_size,
        device=device,
        dtype=DTYPES[dtype_name],
    )
    log.info("%d images in %.1f s", len(prompts), time.monotonic() - start)
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        return [save_png(image_grid(images, nrow=args.nrow), out)]
    written = []
    for i, pixels in enumerate(to_uint8(images)):
        written.append(save_png(Image.fromarray(pixels), out / f"{i:05d}.png"))
    settings = {
        "checkpoint": weights.source,
        "weights": weights.weights,
        "step": weights.step,
        "steps": args.steps,
        "cfg": args.cfg,
        "shift": args.shift,
        "size": [width, height],
        "negative_prompt": args.negative_prompt,
    }
    lines = [
        json.dumps({"index": i, "file": f"{i:05d}.png", "prompt": p, "seed": args.seed + i})
        for i, p in enumerate(prompts)
    ]
    write_atomic(out / "prompts.jsonl", "\n".join(lines) + "\n")
    write_atomic(out / "settings.json", json.dumps(settings, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    if args.shift is not None and args.shift <= 0:
        parser.error("--shift must be > 0 (leave it out to match the training run)")
    try:
        written = run(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    out = Path(args.out)
    print(f"wrote {len(written)} file(s) to {out if out.suffix else out.resolve()}")
    for path in written[:8]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
