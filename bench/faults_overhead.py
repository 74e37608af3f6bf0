"""What the fault machinery costs a training step: the watchdog (its thread writing heartbeats,
`enter` at every step) and the straggler report's block timer (two hooks per block).

Two copies of the same model (same weights) take forward+backward steps in turn (the order
reverses every step, so background load hits both alike): "plain", and "watched", whose
blocks carry the BlockTimer hooks, which enters the watchdog's step section before every
step and reads the timer every `--log-every` steps, as the trainer does at log steps. The
watchdog's thread beats every `--heartbeat-s` (1 s: ten times the default rate) through both.
The medians of the steps are compared.

    python bench/faults_overhead.py                 # tiny model on the CPU, ~1 min
    python bench/faults_overhead.py --preset d24-512 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mmdit.model import MMDiT, MMDiTConfig
from training.stragglers import BlockTimer
from training.watchdog import Beat, Limits, Watchdog

PRESETS = {
    "tiny": dict(depth=2, size=32, text_len=154, batch=2),  # bench/model.py's CPU size
    "d24-512": dict(depth=24, size=64, text_len=154, batch=8),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--iters", type=int, default=60, help="timed steps per copy")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", type=Path, help="JSON (default bench/results/faults_overhead_<dev>.json)"
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    shape = PRESETS[args.preset]
    depth = shape["depth"]
    config = MMDiTConfig(
        depth=depth,
        sample_size=shape["size"],
        pos_embed_max_size=max(96, shape["size"]),
    )
    torch.manual_seed(0)
    plain = MMDiT(config).to(device)
    watched = copy.deepcopy(plain)
    timer = BlockTimer(watched.blocks, device)
    b, size = shape["batch"], shape["size"]
    x = torch.randn(b, config.in_channels, size, size, device=device)
    sigma = torch.rand(b, device=device)
    context = torch.randn(b, shape["text_len"], config.context_dim, device=device)
    pooled = torch.randn(b, config.pooled_dim, device=device)

    def step(model: MMDiT) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x, sigma, context, pooled).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"plain": [], "watched": []}
    block_s = 0.0  # what the timer measured in the watched copy's blocks
    with tempfile.TemporaryDirectory() as run_dir:
        watchdog = Watchdog(
            Path(run_dir),
            0,
            1,
            Limits(setup=3600, step=3600, checkpoint=3600, eval=3600),
            heartbeat_s=args.heartbeat_s,
        ).start()
        try:
            for i in range(args.warmup + args.iters):
                order = ("plain", "watched") if i % 2 == 0 else ("watched", "plain")
                for name in order:
                    if name == "watched":
                        watchdog.enter("step", i)
                        seconds = step(watched)
                        if (i + 1) % args.log_every == 0:
                            block_s += timer.read_and_reset()
                    else:
                        seconds = step(plain)
                    if i >= args.warmup:
                        times[name].append(seconds)
                plain.zero_grad(set_to_none=True)
                watched.zero_grad(set_to_none=True)
        finally:
            watchdog.stop()
        beat = Beat.read(Path(run_dir) / "heartbeats" / "rank_00000.json")
    block_s += timer.read_and_reset()
    median = {name: statistics.median(t) for name, t in times.items()}
    # The spread of the plain copy's own steps: a difference below it is not measurable.
    q = statistics.quantiles(times["plain"], n=4)
    result = {
        "benchmark": "faults_overhead",
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": device.type,
            "cpu_count": os.cpu_count(),
            "loadavg_1_5_15min": list(os.getloadavg()),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "median_s": median,
        "overhead_frac": median["watched"] / median["plain"] - 1,
        "plain_iqr_frac": (q[2] - q[0]) / median["plain"],
        # Forward time in the blocks, warm-up included: a check that the hooks ran.
        "watched_block_forward_s": block_s,
        "watched_total_s": sum(times["watched"]),
        "heartbeats_written": beat.seq if beat is not None else 0,
        "target_overhead_frac": 0.01,
    }
    out = (
        args.out
        or Path(__file__).resolve().parent / "results" / f"faults_overhead_{device.type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"step median: plain {median['plain'] * 1e3:.2f} ms, watched {median['watched'] * 1e3:.2f} "
        f"ms: overhead {100 * result['overhead_frac']:+.2f}% (the plain steps' own interquartile "
        f"range: {100 * result['plain_iqr_frac']:.1f}%); {out}"
    )
    return result


if __name__ == "__main__":
    main()
