"""Forward+backward speed of our MMDiT, eager and compiled, against diffusers'
SD3Transformer2DModel (eager).

All models compute the same function: diffusers' is built from ``mmdit.convert.to_diffusers``
applied to our (randomised) weights, and the outputs are compared before timing. "ours_compiled"
is a copy of our model with every joint block compiled by
``training.regional_compile.compile_blocks`` (the trainer's ``train.compile``). Steps are
interleaved (the order of the models reverses every step) so that clock drift, thermal state and
background load hit all alike; the medians of >= 30 steps each are compared.

    python bench/model.py                                   # tiny config on the CPU (< 2 min)
    python bench/model.py --preset d24-512 --device cuda    # SD3-M size at 512 px, bf16, MFU

On CUDA the JSON also holds TFLOP/s and MFU from ``mmdit.flops`` (exact matmul count, training).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mmdit import flops
from mmdit.convert import to_diffusers
from mmdit.model import MMDiT, MMDiTConfig
from training.regional_compile import compile_blocks, compile_count

PRESETS = {
    # The DESIGN.md CPU comparison: d=2 by the size rule (hidden 128, 2 heads) at 256 px
    # (32x32 latent, 256 image tokens) with the real 77 CLIP + 77 T5 text tokens.
    "tiny": dict(depth=2, size=32, text_len=154, batch=2),
    # SD3-medium at 512 px: 64x64 latent (1024 image tokens), 77 CLIP + 77 T5 text tokens.
    "d24-512": dict(depth=24, size=64, text_len=154, batch=8),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--depth", type=int)
    p.add_argument("--hidden", type=int, help="hidden size (default: 64 * depth)")
    p.add_argument("--heads", type=int, help="attention heads (default: depth)")
    p.add_argument("--size", type=int, help="latent height and width")
    p.add_argument("--width", type=int, help="latent width if not square")
    p.add_argument("--text-len", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--dual", type=int, default=0, help="number of leading dual-attention blocks")
    p.add_argument("--qk-norm", choices=["none", "rms_norm"], default="rms_norm")
    p.add_argument("--iters", type=int, default=50, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument(
        "--compile", action="store_true", help="also torch.compile ours and diffusers whole"
    )
    p.add_argument(
        "--no-compiled",
        action="store_true",
        help="skip ours_compiled (our blocks compiled by training.regional_compile)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--only-ours", action="store_true", help="skip diffusers (e.g. out of memory)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/model_<dev>.json)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.width = args.width or args.size
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def build(args, device, dtype):
    cfg = MMDiTConfig.from_depth(
        args.depth,
        hidden_size=args.hidden,
        num_heads=args.heads,
        sample_size=max(args.size, args.width),
        pos_embed_max_size=max(args.size, args.width, 96),
        qk_norm=args.qk_norm,
        dual_attention_layers=tuple(range(args.dual)),
    )
    torch.manual_seed(0)
    ours = MMDiT(cfg)
    # A fresh MMDiT is the zero function (adaLN-Zero); randomise every weight so that the two
    # models' agreement below means something. Speed does not depend on the values.
    with torch.no_grad():
        for prm in ours.parameters():
            prm.normal_(0.0, 0.02)
    theirs = None
    if not args.only_ours:
        from diffusers import SD3Transformer2DModel

        d_cfg, d_sd = to_diffusers(ours.state_dict(), cfg)
        theirs = SD3Transformer2DModel(**d_cfg)
        theirs.load_state_dict(d_sd)
        theirs = theirs.to(device=device, dtype=dtype).train()
    ours = ours.to(device=device, dtype=dtype).train()
    compiled = None
    if not args.no_compiled:
        # A copy with the same weights, so the eager model stays eager; compiled in place the
        # way the trainer does it (train.compile): each joint block's forward, token dim dynamic.
        compiled = copy.deepcopy(ours)
        compile_blocks(compiled)
    return cfg, ours, compiled, theirs


def make_inputs(cfg, args, device, dtype):
    g = torch.Generator().manual_seed(1)
    b = args.batch
    x = torch.randn(b, cfg.in_channels, args.size, args.width, generator=g)
    sigma = torch.rand(b, generator=g)
    ctx = torch.randn(b, args.text_len, cfg.context_dim, generator=g)
    pooled = torch.randn(b, cfg.pooled_dim, generator=g)
    # sigma stays fp32: both models embed it with a float32 sinusoid.
    x, ctx, pooled = (t.to(device=device, dtype=dtype) for t in (x, ctx, pooled))
    return x, sigma.to(device), ctx, pooled


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = device.type == "cuda"
    # Other work on the machine skews CPU timings badly; keep the evidence with the numbers.
    load_before = os.getloadavg()
    cfg, ours, compiled, theirs = build(args, device, dtype)
    x, sigma, ctx, pooled = make_inputs(cfg, args, device, dtype)

    def f_ours():
        return ours(x, sigma, ctx, pooled)

    def f_compiled():
        return compiled(x, sigma, ctx, pooled)

    def f_theirs():
        # diffusers takes the timestep as sigma * 1000 (DESIGN.md, interop pitfalls).
        return theirs(
            hidden_states=x,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample

    if args.compile:
        f_ours = torch.compile(f_ours)
        f_theirs = torch.compile(f_theirs)

    max_abs_diff = compiled_diff = None
    with torch.no_grad():
        a = f_ours().float()
    scale = a.abs().max().item()
    if theirs is not None:
        with torch.no_grad():
            b = f_theirs().float()
        max_abs_diff = (a - b).abs().max().item()
        print(f"parity: max |ours - diffusers| = {max_abs_diff:.3g} (max |out| = {scale:.3g})")
    compile_s = None
    if compiled is not None:
        # With grad enabled: under no_grad dynamo would build a second, inference-only graph
        # that the timed steps never use. This first call is the forward compile.
        t0 = time.perf_counter()
        c = f_compiled().detach().float()
        compile_s = time.perf_counter() - t0
        compiled_diff = (a - c).abs().max().item()
        print(
            f"parity: max |ours_compiled - ours| = {compiled_diff:.3g}; forward compiled in "
            f"{compile_s:.1f} s ({compile_count()} graphs)",
            flush=True,
        )

    def step(model, fn) -> float:
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn().float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    runs = [("ours", ours, f_ours)]
    runs += [("ours_compiled", compiled, f_compiled)] if compiled is not None else []
    runs += [("diffusers", theirs, f_theirs)] if theirs is not None else []
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    warmup: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for i in range(args.warmup):
        for name, model, fn in runs:
            warmup[name].append(
                step(model, fn)
            )  # the compiled one's first holds the backward compile
            print(f"warmup {i + 1}/{args.warmup} {name}: {warmup[name][-1]:.4f} s", flush=True)
    for i in range(args.iters):
        # Alternate which model goes first so neither always follows the other.
        for name, model, fn in runs if i % 2 == 0 else runs[::-1]:
            times[name].append(step(model, fn))
        line = "  ".join(f"{n} {times[n][-1]:.4f} s" for n in times)
        print(f"iter {i + 1}/{args.iters}  {line}", flush=True)

    med = {n: statistics.median(t) for n, t in times.items()}
    ratio = med["ours"] / med["diffusers"] if "diffusers" in med else None
    ratio_compiled = (
        med["ours_compiled"] / med["diffusers"]
        if "diffusers" in med and "ours_compiled" in med
        else None
    )

    flop_step = args.batch * flops.matmul_flops_per_sample(
        cfg, args.size, args.width, args.text_len, training=True
    )
    approx_step = args.batch * flops.approx_train_flops_per_sample(
        cfg, (args.size // cfg.patch_size) * (args.width // cfg.patch_size), args.text_len
    )
    device_name = flops.device_name(device)
    # Model FLOPs (the work our formula says the step needs) for both: extra work diffusers
    # does (text queries in the last block) counts as overhead, as in any MFU figure.
    perf = {n: {"tflops": flop_step / m / 1e12} for n, m in med.items()}
    peak = flops.peak_bf16_flops(device_name) if cuda and dtype == torch.bfloat16 else None
    if peak:
        for n in perf:
            perf[n]["mfu"] = flops.mfu(flop_step / med[n], peak)

    result = {
        "benchmark": "model_forward_backward",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "device": str(device),
            "device_name": device_name,
            "peak_bf16_flops": peak,
            "loadavg_1_5_15min_before": load_before,
            "loadavg_1_5_15min_after": os.getloadavg(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "config": dataclasses.asdict(cfg),
        "params": flops.param_counts(cfg),
        "parity_max_abs_diff": max_abs_diff,
        "compiled_parity_max_abs_diff": compiled_diff,
        "compiled_forward_compile_s": compile_s,
        "compiled_graphs": compile_count() if compiled is not None else None,
        "train_matmul_flops_per_step": flop_step,
        "train_approx_flops_per_step": approx_step,
        "median_s": med,
        "ratio_ours_over_diffusers": ratio,
        "ratio_ours_compiled_over_diffusers": ratio_compiled,
        "targets": {"ratio_ours_over_diffusers": 0.9, "ratio_ours_compiled_over_diffusers": 0.7},
        "perf": perf,
        "warmup_s": warmup,
        "times_s": times,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"model_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    summary = "  ".join(f"{n} {m * 1e3:.1f} ms" for n, m in med.items())
    print(f"median fwd+bwd: {summary}")
    if ratio:
        print(f"ratio ours/diffusers = {ratio:.3f} (target <= 0.9)")
    if ratio_compiled:
        print(f"ratio ours_compiled/diffusers = {ratio_compiled:.3f} (target <= 0.7)")
    for n, p in perf.items():
        extra = f"  MFU {p['mfu']:.1%}" if "mfu" in p else ""
        print(f"{n}: {p['tflops']:.2f} TFLOP/s{extra}")
    print(f"wrote {out}")
    return result


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


if __name__ == "__main__":
    main()
