"""Throughput of the frozen conditioning: text prompts/s and VAE images/s.

    python bench/conditioning.py --components DIR            # e.g. a real SD3 directory
    python bench/conditioning.py                             # builds the tiny set in a temp dir

Encoding runs batched under torch.inference_mode (TextEncoders.encode / VAE.encode); the JSON
records the batch sizes, the median seconds per batch and the rates.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmdit.conditioning import VAE, TextEncoders

CAPTIONS = [
    "a handwritten digit seven",
    "a photo of an astronaut in a white suit",
    "a cup of coffee on a saucer, seen from above",
    "a tabby cat looking at the camera",
]


def _median_seconds(fn, iters: int, label: str) -> float:
    fn()  # warm-up
    times = []
    for i in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        print(f"{label} {i + 1}/{iters}: {times[-1] * 1000:.1f} ms", flush=True)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--components", help="SD3-layout directory (default: tiny set)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per encode call")
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--t5-length", type=int, default=77)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", default="bench/results/conditioning_cpu.json")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        root = args.components
        if root is None:
            from mmdit.testing.components import make_tiny_components

            root = make_tiny_components(Path(tmp) / "tiny", seed=0)
        text = TextEncoders.from_pretrained(
            root, t5_max_length=args.t5_length, dtype=dtype, device=args.device
        )
        vae = VAE.from_pretrained(root, dtype=dtype, device=args.device)

        prompts = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(args.batch)]
        text_s = _median_seconds(lambda: text.encode(prompts), args.iters, "text")
        images = torch.rand(args.image_batch, 3, args.resolution, args.resolution) * 2 - 1
        vae_s = _median_seconds(lambda: vae.encode(images), args.iters, "vae")

    result = {
        "benchmark": "conditioning_throughput",
        "components": "tiny (mmdit-make-tiny-components)" if args.components is None else root,
        "machine": {
            "cpu_count": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "device": args.device,
        },
        "settings": vars(args),
        "text_median_s_per_batch": text_s,
        "prompts_per_s": args.batch / text_s,
        "vae_median_s_per_batch": vae_s,
        "vae_images_per_s": args.image_batch / vae_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"text: {result['prompts_per_s']:.0f} prompts/s (batch {args.batch}); "
        f"VAE encode: {result['vae_images_per_s']:.1f} images/s at {args.resolution}px; "
        f"wrote {args.out}"
    )


if __name__ == "__main__":
    main()
