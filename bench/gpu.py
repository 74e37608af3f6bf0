"""One GPU, the d24 MMDiT at 512 px in bf16: attention kernels, GEMMs, model forward+backward
(eager vs regional compile, every activation-checkpointing mode, batch 8/16/32), one real
trainer step (DeepSpeed ZeRO-3 on this GPU) and a summary against the MFU targets.

    python bench/gpu.py                 # GPU node, <= 8 min -> bench/results/gpu_<h100|...>.json
    python bench/gpu.py --budget-s 300  # what does not fit is skipped, with a note
    python bench/gpu.py --tiny --device cpu --out /tmp/gpu_tiny.json   # the same code, toy size

Built for one unattended run on a borrowed GPU: every measurement catches CUDA out-of-memory
and records "oom"; the JSON is rewritten after every section (and every model measurement), so
a run killed by a time limit still leaves what it measured; --budget-s is a global time budget
after which the remaining measurements are skipped, each with a note; progress lines carry the
elapsed time, the budget left and an ETA. The order puts the headline numbers first: eager
checkpointing none/block at batch 8 and 16, compiled block at 16 and the bucket recompile
count, then the trainer step, then the rest of the sweep.

Sections of the JSON:

environment  torch / CUDA / cuDNN versions, the device and its bf16 peak, flash-attn / xformers /
             triton / deepspeed versions, and which SDPA kernel the default `sdpa` backend ran
             (the aten op seen by torch.profiler for one forward+backward, plus the CUDA kernels).
attention    forward and forward+backward of `mmdit.attention.attention` for every backend in
             `mmdit.attention.BACKENDS`, at d24's 24 heads x 64, batch 8, 1024 image tokens + 154
             (CLIP 77 + T5 77) or + 333 (T5 length 256) text tokens; a backend that cannot run
             records its error. FLOPs: 4 B H N^2 Dh forward; forward+backward 3.5x that
             (FlashAttention's benchmark convention: the backward counts 2.5x the forward,
             including its recomputation of QK^T).
gemm         bf16 matmul TFLOP/s for the block's linears (tokens x D @ D x 3D qkv, D x D out,
             D x 4D and 4D x D MLP; the modulation D x 6D has one row per sample) at tokens =
             batch x (1024 + 154), in the three layouts a training step runs (forward,
             input gradient, weight gradient).
model        `MMDiT` of configs/d24_512px.yaml (QK RMSNorm), bf16 weights, 64x64 latents,
             154 text tokens: forward + backward of mean(out^2), eager and with
             `training.regional_compile.compile_blocks` (the trainer's train.compile), per
             checkpointing mode and batch. Step time (CUDA events around each step, one
             synchronize after the timed loop), TFLOP/s and MFU in the PaLM convention: model
             FLOPs = `mmdit.flops.matmul_flops_per_sample(training=True)` (no recomputation
             counted) over `mmdit.flops.peak_bf16_flops`; peak memory after a reset. A compiled
             entry that built graphs reports compile_s = first step - median step. `buckets`: the
             compiled model run over every 512 px aspect bucket, and the graphs dynamo built.
trainer      `training.trainer.Trainer` (DeepSpeed ZeRO-3, AdamW, EMA) on one device, in a child
             process as a one-rank group, training configs/d24_512px.yaml (micro batch from
             `training.memory_plan` for this card, no accumulation, no checkpoint writes) from
             cache shards this script makes with the project's own tools: tiny components
             (`make_tiny_components`), 512 px photos from scikit-image/matplotlib as WebDataset
             shards (`write_shards`), `mmdit-precompute`. The numbers are what the trainer logs in
             RUN/metrics.jsonl (its TFLOP/s and MFU use DESIGN.md's closed-form FLOPs), medians
             over the steps after the first few.
summary      headline numbers and the targets: MFU >= 45% (goal 50%) with the best settings; the
             default configs/d24_512px.yaml settings within 5 points of that; <= 4 graphs
             compiled across the 512 px bucket set.

One file of ~1,400 lines on purpose: it is the single command for a borrowed GPU slot, and its
sections share one budget, one failure recorder and one JSON writer; the measurements
themselves call the project's modules (model, attention, FLOPs, memory plan, trainer).

--tiny runs every section at toy size (d2, hidden 128, 16x16 latents, batch 2, 128 px buckets
and cache, a few iterations) so that a CPU exercises the same code; bf16 where the CPU has it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from mmdit import flops  # noqa: E402
from mmdit.atomic_file import atomic_path  # noqa: E402
from mmdit.attention import BACKENDS, attention, check_backend  # noqa: E402
from mmdit.model import MMDiT, MMDiTConfig  # noqa: E402

CONFIG_FILE = "configs/d24_512px.yaml"
GIB = 2**30
# FlashAttention's benchmark convention: backward = 2.5x forward, forward+backward = 3.5x.
ATTENTION_FWD_BWD_FACTOR = 3.5
TARGETS = {
    "mfu_best": 0.45,
    "mfu_best_goal": 0.50,
    "default_config_gap_points": 5.0,
    "graphs_for_bucket_set": 4,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What is measured: the real sizes, or the toy ones of --tiny."""

    model_overrides: tuple[str, ...]  # dotted overrides of CONFIG_FILE's model section
    latent: int  # latent side (pixels / 8)
    text_len: int  # CLIP 77 + T5 77
    long_text_len: int  # CLIP 77 + T5 256
    attention_batch: int
    gemm_batches: tuple[int, ...]
    batches: tuple[int, ...]  # model sweep
    compiled_modes: tuple[str, ...]  # checkpointing modes measured compiled, in priority order
    warmup: int
    iters: int
    bucket_resolution: int
    trainer_resolution: int
    trainer_steps: int
    trainer_skip: int  # first steps left out of the medians (start-up, ZeRO-3 trace checks)
    trainer_micro_batch: int | None  # None: the memory plan's largest for this card
    images: int
    shards: int
    workers: int
    trainer_reserve_s: float  # kept free for the trainer section while the first sweep runs
    compile_guess_s: float  # expected first compile, for budget decisions before one is seen


FULL = Sizes(
    model_overrides=(),
    latent=64,
    text_len=154,
    long_text_len=333,
    attention_batch=8,
    gemm_batches=(8, 16),
    batches=(8, 16, 32),
    compiled_modes=("block", "mlp", "none", "attention"),
    warmup=2,
    iters=10,
    bucket_resolution=512,
    trainer_resolution=512,
    trainer_steps=12,
    trainer_skip=3,
    trainer_micro_batch=None,
    images=192,
    shards=8,
    workers=8,
    trainer_reserve_s=150.0,
    compile_guess_s=90.0,
)
TINY = Sizes(
    model_overrides=("model.depth=2", "model.sample_size=16", "model.pos_embed_max_size=32"),
    latent=16,
    text_len=154,
    long_text_len=333,
    attention_batch=2,
    gemm_batches=(2,),
    batches=(2,),
    compiled_modes=("block",),  # one compile: ~40 s on 2 CPU cores
    warmup=1,
    iters=3,
    bucket_resolution=128,
    trainer_resolution=128,
    trainer_steps=4,
    trainer_skip=2,
    trainer_micro_batch=2,
    images=16,
    shards=2,
    workers=1,
    trainer_reserve_s=30.0,
    compile_guess_s=45.0,
)


# ---------------------------------------------------------------------------------------------
# Plumbing: budget, progress, the JSON written as it grows, guarded measurements


class Budget:
    def __init__(self, seconds: float):
        self.total = seconds
        self.start = time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total - self.spent()


class Run:
    """Everything a section needs: settings, device, budget, and the report it fills."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, out: Path):
        self.args = args
        self.sizes = sizes
        self.out = out
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = _model_dtype(self.device)
        self.budget = Budget(args.budget_s)
        self.report: dict[str, Any] = {
            "benchmark": "gpu",
            "tiny": args.tiny,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "budget_s": args.budget_s,
            "dtype": str(self.dtype).removeprefix("torch."),
            "sizes": dataclasses.asdict(sizes),
        }

    def log(self, message: str) -> None:
        b = self.budget
        print(f"[{b.spent():6.1f} s | {b.left():6.1f} s left] {message}", flush=True)

    def save(self) -> None:
        """Rewrite the whole JSON (atomically): a run killed later still leaves this much."""
        self.report["wall_s"] = round(self.budget.spent(), 3)
        with atomic_path(self.out) as tmp:
            tmp.write_text(json.dumps(self.report, indent=1) + "\n")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def _model_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16
    # bf16 on CPUs with native bf16 dot products (AVX512-BF16 / AMX); emulated bf16 would
    # only measure the emulation.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def failure(e: BaseException) -> str:
    """How a failed measurement is recorded: "oom", or the exception's first line."""
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "oom"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:500]


def guarded(fn: Callable[[], dict], cleanup: Callable[[], None] | None = None) -> dict:
    """fn() or {"status": "oom" | "<error>"}; memory is released after a failure."""
    try:
        return {"status": "ok", **fn()}
    except Exception as e:
        status = failure(e)
    # Out of the except block: the traceback, and the tensors its frames hold, are gone.
    if cleanup is not None:
        cleanup()
    free_memory()
    return {"status": status}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_section(run: Run, name: str, fn: Callable[[Run, dict], None], min_s: float) -> None:
    """Run one section into run.report[name] (kept if it exists: the model sweep comes in two
    parts), skipping it with a note when the budget cannot hold it, and recording an error
    instead of stopping the run when it fails."""
    section = run.report.setdefault(name, {})
    if run.budget.left() < min_s:
        note = (
            f"skipped: {run.budget.left():.0f} s of --budget-s {run.budget.total:g} left, "
            f"this part needs ~{min_s:.0f} s"
        )
        section.setdefault("skipped", []).append(note)
        run.log(f"{name}: {note}")
        run.save()
        return
    run.log(f"{name}: start")
    t0 = time.perf_counter()
    failed = None
    try:
        fn(run, section)
    except Exception as e:
        failed = {"error": failure(e), "traceback": traceback.format_exc()[-3000:]}
    if failed is not None:
        section.setdefault("errors", []).append(failed)
        run.log(f"{name}: failed: {failed['error']}")
        free_memory()
    section["section_s"] = round(section.get("section_s", 0.0) + time.perf_counter() - t0, 3)
    run.save()
    run.log(f"{name}: done")


# ---------------------------------------------------------------------------------------------
# Timing


def time_steps(run: Run, fn: Callable[[], Any], warmup: int, iters: int) -> dict:
    """First call (synchronized; holds any compile), then `warmup - 1` more untimed calls,
    then `iters` timed ones: CUDA events around each call and a single synchronize after the
    loop, or the wall clock on a CPU (where every op is synchronous)."""
    run.sync()
    t0 = time.perf_counter()
    fn()
    run.sync()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    run.sync()
    times: list[float] = []
    t0 = time.perf_counter()
    if run.cuda:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(run.device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(iters):
            s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    return {
        "first_call_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "loop_mean_s": wall / iters,
        "times_s": times,
    }


def time_loop(run: Run, fn: Callable[[], Any], target_s: float = 0.02, repeats: int = 3) -> dict:
    """Mean time per call of a short op: loops of n calls (n chosen so a loop takes about
    target_s), synchronized around each loop only; the median loop is kept."""
    fn()
    run.sync()
    t0 = time.perf_counter()
    fn()
    run.sync()
    one = max(time.perf_counter() - t0, 1e-7)
    n = int(min(200, max(3, target_s / one)))
    means = []
    for _ in range(repeats):
        run.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        run.sync()
        means.append((time.perf_counter() - t0) / n)
    return {"median_s": statistics.median(means), "calls_per_loop": n, "loop_means_s": means}


def tflops(flop: float, seconds: float) -> float:
    return flop / seconds / 1e12


# ---------------------------------------------------------------------------------------------
# Environment


_KNOWN_DEVICES = ("gh200", "h200", "h100", "h800", "b200", "a100", "a800", "l40s", "a10g", "l4")


def device_slug(name: str, device_type: str = "cuda") -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the file name's device part."""
    if device_type != "cuda":
        return "cpu"
    low = name.lower()
    for known in _KNOWN_DEVICES:
        if re.search(rf"(?<![a-z0-9]){known}(?![0-9])", low):
            return known
    return re.sub(r"[^a-z0-9]+", "_", low.removeprefix("nvidia ")).strip("_") or "gpu"


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


# aten ops that name the kernel SDPA dispatched to (the CUDA kernels' names vary by version).
_SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
_KERNEL_WORDS = ("flash", "fmha", "attention", "attn", "cudnn", "softmax", "sdpa")


def sdpa_kernel_used(run: Run, n_tokens: int) -> dict:
    """Which kernel the default `sdpa` backend really ran for one forward+backward at the
    benchmark's shape, read from torch.profiler's op and kernel names."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model_config(run.sizes)
    q, k, v = attention_inputs(run, run.sizes.attention_batch, n_tokens, cfg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    with profile(activities=activities) as prof:
        out = attention(q, k, v, None, "sdpa")
        out.backward(torch.ones_like(out))
        run.sync()
    ops = sorted({e.name for e in prof.events() if e.name in _SDPA_OPS})
    kernels: list[str] = []
    if run.cuda:
        names = {e.key for e in prof.key_averages()}
        kernels = sorted(
            n
            for n in names
            if any(w in n.lower() for w in _KERNEL_WORDS) and not n.startswith("aten::")
        )[:12]
    kinds = sorted({_SDPA_OPS[o] for o in ops})
    return {
        "kernel": kinds[0] if len(kinds) == 1 else (kinds or None),
        "equivalent_backend": f"sdpa_{kinds[0]}" if len(kinds) == 1 else None,
        "aten_ops": ops,
        "cuda_kernels": kernels,
        "shape_bnhd": [run.sizes.attention_batch, n_tokens, cfg.num_heads, cfg.head_dim],
    }


def section_environment(run: Run, section: dict) -> None:
    name = flops.device_name(run.device)
    section.update(
        {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15min": os.getloadavg(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()
            if torch.backends.cudnn.is_available()
            else None,
            "device": str(run.device),
            "device_name": name,
            "device_slug": device_slug(name, run.device.type),
            "peak_bf16_flops": flops.peak_bf16_flops(name) if run.cuda else None,
            "dtype": str(run.dtype).removeprefix("torch."),
            "git_commit": _git_commit(),
            "packages": {
                dist: _version(dist)
                for dist in ("flash-attn", "flash_attn_3", "xformers", "triton", "deepspeed")
            },
            "flash_attn_interface_importable": _importable("flash_attn_interface"),
        }
    )
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        section["capability"] = f"{props.major}.{props.minor}"
        section["memory_gib"] = round(props.total_memory / GIB, 2)
        section["multiprocessors"] = props.multi_processor_count
    n_img = (run.sizes.latent // 2) ** 2
    section["sdpa_default"] = guarded(lambda: sdpa_kernel_used(run, n_img + run.sizes.text_len))
    kernel = section["sdpa_default"].get("kernel")
    run.log(f"environment: {name}, torch {torch.__version__}, sdpa ran the {kernel} kernel")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------
# Attention and GEMMs


def model_config(sizes: Sizes) -> MMDiTConfig:
    """The model section of configs/d24_512px.yaml (tiny: with the toy overrides)."""
    from mmdit.typed_config import load
    from training.config import RunConfig

    # The data resolution follows the sizes too: the run file check rejects buckets wider
    # than the (tiny) model's position grid.
    overrides = [*sizes.model_overrides, f"data.resolution={sizes.bucket_resolution}"]
    return load(RunConfig, str(ROOT / CONFIG_FILE), overrides).model


def attention_inputs(run: Run, batch: int, n_tokens: int, cfg: MMDiTConfig):
    g = torch.Generator(device=run.device).manual_seed(0)
    shape = (batch, n_tokens, cfg.num_heads, cfg.head_dim)
    return tuple(
        torch.randn(shape, generator=g, device=run.device, dtype=run.dtype).requires_grad_()
        for _ in range(3)
    )


def measure_attention(run: Run, backend: str, batch: int, n_tokens: int, cfg: MMDiTConfig):
    check_backend(backend)  # a missing package fails here, with its install hint
    q, k, v = attention_inputs(run, batch, n_tokens, cfg)
    dout = torch.randn(batch, n_tokens, cfg.hidden_size, device=run.device, dtype=run.dtype)

    def fwd():
        with torch.no_grad():
            attention(q, k, v, None, backend)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        attention(q, k, v, None, backend).backward(dout)

    flop = 4 * batch * cfg.num_heads * n_tokens**2 * cfg.head_dim
    f = time_loop(run, fwd)
    fb = time_loop(run, fwd_bwd)
    return {
        "fwd_s": f["median_s"],
        "fwd_bwd_s": fb["median_s"],
        "fwd_flop": flop,
        "fwd_bwd_flop": ATTENTION_FWD_BWD_FACTOR * flop,
        "fwd_tflops": tflops(flop, f["median_s"]),
        "fwd_bwd_tflops": tflops(ATTENTION_FWD_BWD_FACTOR * flop, fb["median_s"]),
    }


def section_attention(run: Run, section: dict) -> None:
    cfg = model_config(run.sizes)
    n_img = (run.sizes.latent // 2) ** 2
    b = run.sizes.attention_batch
    section["flop_convention"] = (
        "forward 4*B*H*N^2*Dh (QK^T and PV); forward+backward 3.5x that (FlashAttention's "
        "benchmark convention: backward 2.5x forward, its QK^T recomputation included). "
        "mmdit.flops counts attention 3x forward for MFU (no recomputation)."
    )
    section["heads"], section["head_dim"], section["batch"] = cfg.num_heads, cfg.head_dim, b
    results = section.setdefault("results", [])
    for text in (run.sizes.text_len, run.sizes.long_text_len):
        n = n_img + text
        for backend in BACKENDS:
            entry = {"backend": backend, "image_tokens": n_img, "text_tokens": text, "tokens": n}
            entry.update(
                guarded(lambda backend=backend, n=n: measure_attention(run, backend, b, n, cfg))
            )
            results.append(entry)
            if entry["status"] == "ok":
                ms, tf = entry["fwd_bwd_s"] * 1e3, entry["fwd_bwd_tflops"]
                msg = f"{ms:.3f} ms fwd+bwd, {tf:.1f} TFLOP/s"
            else:
                msg = entry["status"]
            run.log(f"attention {backend:14s} N={n}: {msg}")
        run.save()


def gemm_cases(cfg: MMDiTConfig, batch: int, tokens_per_sample: int) -> list[dict]:
    """(name, layout, M, N, K) of the block's linears: y = x W^T (forward), dx = dy W (input
    gradient), dW = dy^T x (weight gradient), as autograd runs them for nn.Linear."""
    D, H = cfg.hidden_size, cfg.mlp_hidden
    tokens = batch * tokens_per_sample
    linears = [  # name, rows, in, out
        ("qkv", tokens, D, 3 * D),
        ("attn_out", tokens, D, D),
        ("mlp_up", tokens, D, H),
        ("mlp_down", tokens, H, D),
        ("modulation", batch, D, 6 * D),  # one conditioning row per sample, as in the model
    ]
    cases = []
    for name, rows, n_in, n_out in linears:
        cases += [
            {"name": name, "layout": "forward", "M": rows, "N": n_out, "K": n_in},
            {"name": name, "layout": "input_grad", "M": rows, "N": n_in, "K": n_out},
            {"name": name, "layout": "weight_grad", "M": n_out, "N": n_in, "K": rows},
        ]
    for c in cases:
        c["batch"] = batch
    return cases


def measure_gemm(run: Run, case: dict) -> dict:
    M, N, K = case["M"], case["N"], case["K"]
    g = torch.Generator(device=run.device).manual_seed(0)
    # The operand layouts autograd uses for nn.Linear (transposed views, no copies).
    if case["layout"] == "forward":  # x (M, K) @ W^T, W (N, K)
        a = torch.randn(M, K, generator=g, device=run.device, dtype=run.dtype)
        b = torch.randn(N, K, generator=g, device=run.device, dtype=run.dtype).t()
    elif case["layout"] == "input_grad":  # dy (M, K) @ W (K, N)
        a = torch.randn(M, K, generator=g, device=run.device, dtype=run.dtype)
        b = torch.randn(K, N, generator=g, device=run.device, dtype=run.dtype)
    else:  # dy^T (M, K) @ x (K, N), dy stored (K, M)
        a = torch.randn(K, M, generator=g, device=run.device, dtype=run.dtype).t()
        b = torch.randn(K, N, generator=g, device=run.device, dtype=run.dtype)
    t = time_loop(run, lambda: torch.matmul(a, b))
    flop = 2 * M * N * K
    return {"flop": flop, "seconds": t["median_s"], "tflops": tflops(flop, t["median_s"])}


def section_gemm(run: Run, section: dict) -> None:
    cfg = model_config(run.sizes)
    per_sample = (run.sizes.latent // 2) ** 2 + run.sizes.text_len
    section["hidden"], section["tokens_per_sample"] = cfg.hidden_size, per_sample
    results = section.setdefault("results", [])
    for batch in run.sizes.gemm_batches:
        for case in gemm_cases(cfg, batch, per_sample):
            entry = {**case, **guarded(lambda case=case: measure_gemm(run, case))}
            results.append(entry)
            shape = f"{case['M']}x{case['K']} @ {case['K']}x{case['N']}"
            msg = f"{entry['tflops']:.1f} TFLOP/s" if entry["status"] == "ok" else entry["status"]
            run.log(f"gemm b{batch} {case['name']:10s} {case['layout']:11s} {shape}: {msg}")
        run.save()


# ---------------------------------------------------------------------------------------------
# Model forward+backward sweep


def sweep_plan(sizes: Sizes) -> tuple[list[tuple[bool, str, int]], list[tuple[bool, str, int]]]:
    """(compiled, checkpointing, batch) in two parts, most important first. The first part
    runs before the trainer step, the rest after it. Compiled entries take every mode at the
    main batch first (each new mode builds its graphs), then the other batches (each mode's
    graphs are built once more when its batch first changes; dynamo then makes the batch
    dimension dynamic)."""
    batches = sizes.batches
    main = batches[min(1, len(batches) - 1)]  # 16 (the only one in --tiny)
    first = [(False, m, b) for b in batches[:2] for m in ("none", "block")]
    first.append((True, "block", main))
    by_priority = [main] + [b for b in batches if b != main]  # 16, 8, 32
    rest = [
        (False, m, b)
        for b in by_priority
        for m in ("mlp", "attention", "none", "block")
        if (False, m, b) not in first
    ]
    larger = sorted(b for b in batches if b > main)
    smaller = sorted((b for b in batches if b < main), reverse=True)
    compiled_order = [main, *larger, *smaller]  # 16, 32, 8
    rest += [
        (True, m, b)
        for b in compiled_order
        for m in sizes.compiled_modes
        if (True, m, b) not in first
    ]
    return first, rest


def build_model(run: Run, cfg: MMDiTConfig) -> MMDiT:
    torch.manual_seed(0)
    # Built on the device with torch's default init (fast for 2B parameters; the project's
    # init draws on the CPU): speed does not depend on the values, and unlike the adaLN-Zero
    # init every gate is non-zero.
    with torch.device(run.device):
        model = MMDiT(cfg, initialize=False)
    return model.to(run.dtype).train()


def model_inputs(run: Run, cfg: MMDiTConfig, batch: int, h: int, w: int, text_len: int):
    g = torch.Generator(device=run.device).manual_seed(1)
    dev, dt = run.device, run.dtype
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g, device=dev, dtype=dt)
    sigma = torch.rand(batch, generator=g, device=dev)  # fp32, as the trainer passes it
    ctx = torch.randn(batch, text_len, cfg.context_dim, generator=g, device=dev, dtype=dt)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g, device=dev, dtype=dt)
    return x, sigma, ctx, pooled


def train_step_fn(model: MMDiT, inputs) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        model(*inputs).float().square().mean().backward()

    return step


class ModelSweep:
    """One model for one part of the sweep: eager entries first, then compile_blocks once."""

    def __init__(self, run: Run, section: dict):
        self.run, self.section = run, section
        self.cfg = model_config(run.sizes)
        self.model: MMDiT | None = None
        self.compiled = False
        self.graphs_before_compile = 0
        n_img = (run.sizes.latent // 2) ** 2
        self.flop_per_sample = flops.matmul_flops_per_sample(
            self.cfg, run.sizes.latent, run.sizes.latent, run.sizes.text_len, training=True
        )
        name = flops.device_name(run.device)
        self.peak = flops.peak_bf16_flops(name) if run.cuda else None
        section.setdefault("config", dataclasses.asdict(self.cfg))
        section.setdefault("latent", [run.sizes.latent, run.sizes.latent])
        section.setdefault("image_tokens", n_img)
        section.setdefault("text_tokens", run.sizes.text_len)
        section.setdefault("train_matmul_flops_per_sample", self.flop_per_sample)
        section.setdefault("peak_bf16_flops", self.peak)
        section.setdefault(
            "mfu_convention",
            "PaLM: model FLOPs (mmdit.flops.matmul_flops_per_sample, training=True, no "
            "recomputation counted) per second / dense bf16 peak",
        )
        section.setdefault("entries", [])

    def ensure_model(self, compiled: bool) -> None:
        from training.regional_compile import compile_blocks, compile_count

        if self.model is None:
            self.model = build_model(self.run, self.cfg)
        if compiled and not self.compiled:
            _raise_recompile_limit()
            self.graphs_before_compile = compile_count()
            compile_blocks(self.model)
            self.compiled = True

    def step_estimate(self, entry_key: tuple[bool, str, int]) -> float:
        """Seconds an entry will take, from what was measured so far."""
        compiled, mode, batch = entry_key
        done = [e for e in self.section["entries"] if e.get("status") == "ok"]
        per_sample = max((e["median_s"] / e["batch"] for e in done), default=0.05)
        steps = self.run.sizes.warmup + self.run.sizes.iters
        est = steps * per_sample * batch * (1.4 if mode != "none" else 1.0)
        if compiled:
            seen = [e for e in done if e["compiled"] and e["checkpointing"] == mode]
            batches = {e["batch"] for e in seen}
            if not seen or (len(batches) == 1 and batch not in batches):
                compiles = [e["compile_s"] for e in done if e.get("compile_s")]
                est += max(compiles, default=self.run.sizes.compile_guess_s)
        return est

    def measure(self, key: tuple[bool, str, int], part: int) -> dict:
        from training.regional_compile import compile_count

        compiled, mode, batch = key
        run, s = self.run, self.run.sizes
        entry: dict[str, Any] = {
            "compiled": compiled,
            "checkpointing": mode,
            "batch": batch,
            "part": part,
        }
        inputs = None

        def body() -> dict:
            nonlocal inputs
            self.ensure_model(compiled)
            self.model.set_activation_checkpointing(mode)
            inputs = model_inputs(run, self.cfg, batch, s.latent, s.latent, s.text_len)
            if run.cuda:
                torch.cuda.reset_peak_memory_stats(run.device)
            graphs0 = compile_count()
            t = time_steps(run, train_step_fn(self.model, inputs), s.warmup, s.iters)
            flop = batch * self.flop_per_sample
            out = {
                **t,
                "flop_per_step": flop,
                "tflops": tflops(flop, t["median_s"]),
                "mfu": flops.mfu(flop / t["median_s"], self.peak) if self.peak else None,
                "graphs_added": compile_count() - graphs0,
                "graphs_total": compile_count(),
            }
            if compiled and out["graphs_added"]:
                out["compile_s"] = t["first_call_s"] - t["median_s"]
            if run.cuda:
                out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(run.device) / GIB
                out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(run.device) / GIB
            return out

        def cleanup():
            nonlocal inputs
            inputs = None
            if self.model is not None:
                self.model.zero_grad(set_to_none=True)

        entry.update(guarded(body, cleanup))
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)
        return entry

    def bucket_pass(self, batch: int, mode: str) -> dict:
        """The compiled model over every aspect bucket of the bucket resolution: the graphs
        dynamo builds for the whole set (the trainer's `compiled_graphs`)."""
        from data_pipeline.buckets import make_buckets
        from training.regional_compile import compile_count

        run = self.run
        buckets = make_buckets(run.sizes.bucket_resolution)
        self.ensure_model(True)
        self.model.set_activation_checkpointing(mode)
        out: dict[str, Any] = {
            "resolution": run.sizes.bucket_resolution,
            "buckets": len(buckets),
            "batch": batch,
            "checkpointing": mode,
            "graphs_before_compile": self.graphs_before_compile,
            "graphs_before_buckets": compile_count(),
            "per_bucket": [],
        }
        for h, w in buckets:
            inputs = model_inputs(run, self.cfg, batch, h // 8, w // 8, run.sizes.text_len)
            run.sync()
            t0 = time.perf_counter()
            train_step_fn(self.model, inputs)()
            run.sync()
            out["per_bucket"].append(
                {
                    "bucket": [h, w],
                    "latent": [h // 8, w // 8],
                    "image_tokens": (h // 16) * (w // 16),
                    "seconds": time.perf_counter() - t0,
                    "graphs": compile_count(),
                }
            )
        self.model.zero_grad(set_to_none=True)
        out["graphs_after_buckets"] = compile_count()
        out["graphs_built"] = out["graphs_after_buckets"] - self.graphs_before_compile
        out["recompiles_for_buckets"] = out["graphs_after_buckets"] - out["graphs_before_buckets"]
        return out

    def close(self) -> None:
        self.model = None
        free_memory()


def _raise_recompile_limit() -> None:
    """The sweep changes checkpointing mode and batch in one process (a training run never
    does): each combination is another graph of the same code, and past dynamo's default
    limit of 8 it would silently run the rest eagerly."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))


def _entry_line(e: dict) -> str:
    tag = f"{'compiled' if e['compiled'] else 'eager'}/{e['checkpointing']}/b{e['batch']}"
    if e["status"] != "ok":
        return f"model {tag}: {e['status']}"
    line = f"model {tag}: {e['median_s'] * 1e3:.1f} ms/step, {e['tflops']:.2f} TFLOP/s"
    if e.get("mfu") is not None:
        line += f", MFU {e['mfu']:.1%}"
    if e.get("peak_allocated_gib") is not None:
        line += f", peak {e['peak_allocated_gib']:.1f} GiB"
    if e.get("compile_s"):
        line += f", compiled in {e['compile_s']:.1f} s ({e['graphs_added']} graphs)"
    return line


def sweep_part(part: int) -> Callable[[Run, dict], None]:
    def section_model(run: Run, section: dict) -> None:
        first, rest = sweep_plan(run.sizes)
        keys = first if part == 1 else rest
        # While the first part runs, time is kept for the trainer section after it.
        reserve = run.sizes.trainer_reserve_s if part == 1 else 5.0
        sweep = ModelSweep(run, section)
        started = time.perf_counter()
        try:
            for i, key in enumerate(keys):
                est = sweep.step_estimate(key)
                if run.budget.left() - reserve < est:
                    section["entries"].append(
                        {
                            "compiled": key[0],
                            "checkpointing": key[1],
                            "batch": key[2],
                            "part": part,
                            "status": f"skipped: budget ({run.budget.left():.0f} s left, "
                            f"~{est:.0f} s needed, {reserve:.0f} s kept for later sections)",
                        }
                    )
                    run.log(f"model {key}: skipped (budget)")
                    continue
                entry = sweep.measure(key, part)
                section["entries"].append(entry)
                done = i + 1
                eta = (time.perf_counter() - started) / done * (len(keys) - done)
                run.log(f"{_entry_line(entry)}  [{done}/{len(keys)}, ETA ~{eta:.0f} s]")
                run.save()
                if part == 1 and key == first[-1]:
                    bucket_step(run, section, sweep, key)
        finally:
            sweep.close()

    return section_model


def bucket_step(run: Run, section: dict, sweep: ModelSweep, key: tuple[bool, str, int]) -> None:
    """Right after the first compiled entry, with its mode and batch: the recompile check."""
    from data_pipeline.buckets import make_buckets

    done = [e for e in section["entries"] if e.get("status") == "ok"]
    per_step = max((e["median_s"] for e in done if e["batch"] == key[2]), default=1.0)
    n = len(make_buckets(run.sizes.bucket_resolution))
    est = 1.5 * n * per_step
    if run.budget.left() - run.sizes.trainer_reserve_s < est:
        section["buckets"] = {"status": f"skipped: budget (~{est:.0f} s needed)"}
        run.log("model buckets: skipped (budget)")
        return
    section["buckets"] = guarded(lambda: sweep.bucket_pass(key[2], key[1]))
    b = section["buckets"]
    if b["status"] == "ok":
        run.log(
            f"model buckets: {b['buckets']} buckets at {b['resolution']} px, {b['graphs_built']} "
            f"graphs built in all, {b['recompiles_for_buckets']} of them for new bucket shapes"
        )
    else:
        run.log(f"model buckets: {b['status']}")
    run.save()


# ---------------------------------------------------------------------------------------------
# One real trainer step


def trainer_overrides(
    run: Run, work: Path, components: Path, cache: Path, micro: int | None
) -> list[str]:
    """configs/d24_512px.yaml's settings with only what a one-device benchmark must change;
    micro None: the config's micro batch."""
    s = run.sizes
    micro_batch = [] if micro is None else [f"train.micro_batch_size={micro}"]
    return [
        *s.model_overrides,
        f"train.run_dir={work / 'run'}",
        f"train.max_steps={s.trainer_steps}",
        *micro_batch,
        "train.global_batch_size=0",  # no accumulation: the cluster run's 2048 = 32 x 64 GPUs x 1
        "train.log_every=1",
        "eval.val_every=0",
        f"data.cache_shards={cache}",
        f"data.resolution={s.trainer_resolution}",
        f"data.num_workers={s.workers}",
        f"conditioning.components={components}",
    ]


def prepare_cache(run: Run, work: Path) -> tuple[Path, Path]:
    """Tiny components, photo shards at the trainer's resolution and their cache, all made with
    the project's own tools. Returns (components, cache dir)."""
    from data_pipeline.precompute import main as precompute_main
    from data_pipeline.shard_writer import Item, write_shards
    from data_pipeline.testing.demo_set import photo_samples
    from mmdit.testing.components import make_tiny_components

    s = run.sizes
    components = make_tiny_components(work / "components", seed=0)
    samples, _ = photo_samples(s.trainer_resolution, warn=lambda m: run.log(f"trainer: {m}"))
    if not samples:
        raise RuntimeError("no bundled scikit-image / matplotlib photo could be loaded")
    images = work / "images"
    images.mkdir()
    items = []
    for i in range(s.images):
        sample = samples[i % len(samples)]
        path = images / f"{i:05d}.jpg"
        sample.render().save(path, quality=95)
        items.append(Item(path, path.name, sample.caption))
    per_shard = math.ceil(s.images / s.shards)
    write_shards(iter(items), len(items), work / "raw", max_count=per_shard, progress=False)
    cache = work / "cache"
    argv = [
        "--config", str(ROOT / CONFIG_FILE), "--out", str(cache),
        "--device", run.device.type, "--rank", "0", "--world-size", "1",
        f"data.shards={work / 'raw'}", f"data.resolution={s.trainer_resolution}",
        f"conditioning.components={components}",
    ]  # fmt: skip
    if precompute_main(argv) != 0:
        raise RuntimeError("mmdit-precompute failed (see its message above)")
    free_memory()
    return components, cache


def trainer_micro_batch(run: Run, overrides: list[str]) -> tuple[int, dict]:
    """The config's micro batch, or the memory plan's largest for this card if that is less."""
    from mmdit.typed_config import load
    from training.config import RunConfig
    from training.memory_plan import plan

    s = run.sizes
    if s.trainer_micro_batch is not None:
        return s.trainer_micro_batch, {}
    cfg = load(RunConfig, str(ROOT / CONFIG_FILE), overrides)
    memory = torch.cuda.get_device_properties(run.device).total_memory / GIB if run.cuda else 80
    p = plan(cfg, world_size=1, gpu_memory_gb=memory)
    mode = cfg.train.activation_checkpointing
    fit = next(m for m in p.modes if m.mode == mode)
    micro = max(1, min(cfg.train.micro_batch_size, fit.max_micro_batch))
    return micro, {
        "config_micro_batch": cfg.train.micro_batch_size,
        "plan_max_micro_batch": fit.max_micro_batch,
        "plan_gpu_memory_gib": round(memory, 2),
    }


def plan_bytes(overrides: list[str], micro: int, memory_gib: float) -> int:
    from mmdit.typed_config import load
    from training.config import RunConfig
    from training.memory_plan import plan

    cfg = load(RunConfig, str(ROOT / CONFIG_FILE), [*overrides, f"train.micro_batch_size={micro}"])
    return plan(cfg, world_size=1, gpu_memory_gb=memory_gib).total_bytes


def launch_trainer(run: Run, work: Path, overrides: list[str], timeout: float) -> dict:
    """The trainer in a child process (a one-rank process group of its own, the GPU memory of
    the sweep released), its log relayed; killed with its process group at the timeout."""
    from mmdit.distributed import free_ports

    spec = work / "trainer_spec.json"
    memory_out = work / "trainer_memory.json"
    spec.write_text(
        json.dumps(
            {"config": str(ROOT / CONFIG_FILE), "overrides": overrides, "memory": str(memory_out)}
        )
    )
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    if not run.cuda:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    log_path = work / "trainer.log"
    metrics_path = work / "run" / "metrics.jsonl"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trainer-child", str(spec)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        child = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        seen_lines = seen_rows = 0
        timed_out = False
        first_row_s = None
        while child.poll() is None:
            time.sleep(1.0)
            seen_lines = _relay(run, log_path, seen_lines)
            rows = _metric_rows(metrics_path)
            if rows and first_row_s is None:
                first_row_s = time.perf_counter() - t0
            for row in rows[seen_rows:]:
                run.log(f"trainer step {row['step']}/{run.sizes.trainer_steps}: {_row_line(row)}")
            seen_rows = len(rows)
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)  # the child's own session: it and its workers
                child.wait()
        _relay(run, log_path, seen_lines)
    tail = log_path.read_text(errors="replace").splitlines()[-40:]
    memory = json.loads(memory_out.read_text()) if memory_out.exists() else {}
    return {
        "returncode": child.returncode,
        "timed_out": timed_out,
        "wall_s": time.perf_counter() - t0,
        "rendezvous_port": port,
        "first_metrics_row_s": first_row_s,
        "rows": _metric_rows(metrics_path),
        "memory": memory,
        "log_tail": tail if child.returncode != 0 else [],
    }


_RELAY = re.compile(r"\[rank 0\]|Error|error:|Traceback|Killed")


def _relay(run: Run, log_path: Path, seen: int) -> int:
    """Print the child's new log lines that matter (its logger's and errors)."""
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines[seen:]:
        if _RELAY.search(line):
            print(f"    trainer| {line[:220]}", flush=True)
    return len(lines)


def _metric_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            row = json.loads(line)
            if "samples_per_s" in row:
                rows.append(row)
    return rows


def _row_line(row: dict) -> str:
    line = f"{row['samples_per_s']:.2f} samples/s, {row['tflops_per_s']:.3f} TFLOP/s"
    if row.get("mfu") is not None:
        line += f", MFU {row['mfu']:.1%}"
    return line + f", data wait {row['data_wait_frac']:.1%}"


def summarize_trainer(rows: list[dict], skip: int, micro: int, flop_per_sample: float) -> dict:
    """Medians over the steps after the first `skip` of what the trainer logged (log_every=1:
    one row per step), plus the exact matmul count's TFLOP/s for comparison."""
    kept = [r for r in rows if r["step"] > skip] or rows
    if not kept:
        return {}

    def med(key: str) -> float | None:
        values = [r[key] for r in kept if r.get(key) is not None]
        return statistics.median(values) if values else None

    sps = med("samples_per_s")
    return {
        "steps_in_median": [r["step"] for r in kept],
        "step_s": micro / sps,
        "samples_per_s": sps,
        "tflops_per_s": med("tflops_per_s"),
        "mfu": med("mfu"),
        "data_wait_frac": med("data_wait_frac"),
        "tokens_per_s": med("tokens_per_s"),
        "matmul_tflops_per_s": sps * flop_per_sample / 1e12,
        "loss_last": kept[-1].get("loss"),
    }


def section_trainer(run: Run, section: dict) -> None:
    s = run.sizes
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        components, cache = prepare_cache(run, work)
        section["prepare_s"] = time.perf_counter() - t0
        run.log(
            f"trainer: {s.images} photos at {s.trainer_resolution} px cached in "
            f"{section['prepare_s']:.1f} s"
        )
        base = trainer_overrides(run, work, components, cache, micro=None)
        micro, micro_info = trainer_micro_batch(run, base)
        overrides = trainer_overrides(run, work, components, cache, micro)
        section.update(
            {"config": CONFIG_FILE, "overrides": overrides, "micro_batch": micro, **micro_info}
        )
        section["parent_allocated_gib_at_launch"] = (
            torch.cuda.memory_allocated(run.device) / GIB if run.cuda else None
        )
        cfg = model_config(s)
        n_img = (s.trainer_resolution // 16) ** 2
        flop_per_sample = flops.matmul_flops_per_sample(
            cfg, s.trainer_resolution // 8, s.trainer_resolution // 8, s.text_len, training=True
        )
        for attempt in range(2):
            result = launch_trainer(run, work, overrides, timeout=run.budget.left() - 10.0)
            section["attempts"] = [*section.get("attempts", []), {
                "micro_batch": micro, "returncode": result["returncode"],
                "timed_out": result["timed_out"], "wall_s": result["wall_s"],
            }]  # fmt: skip
            oom = any("out of memory" in line.lower() for line in result["log_tail"])
            if not (oom and attempt == 0 and micro > 1 and run.budget.left() > 120):
                break
            micro //= 2  # the plan was optimistic: once more at half the micro batch
            run.log(f"trainer: out of memory; again at micro batch {micro}")
            shutil.rmtree(work / "run", ignore_errors=True)
            overrides = trainer_overrides(run, work, components, cache, micro)
        section["micro_batch"] = micro
        section["status"] = (
            "ok"
            if result["returncode"] == 0
            else "timeout"
            if result["timed_out"]
            else "oom"
            if oom
            else f"failed (exit {result['returncode']})"
        )
        keys = ("first_metrics_row_s", "rendezvous_port", "memory", "log_tail")
        section.update({k: result[k] for k in keys})
        section["rows"] = result["rows"]
        section["flop_convention"] = (
            "tflops_per_s and mfu as the trainer logs them: DESIGN.md's 6 P N + 12 D h N^2 per "
            "sample; matmul_tflops_per_s: mmdit.flops.matmul_flops_per_sample (PaLM, as the model "
            "sweep)"
        )
        section["image_tokens"] = n_img
        section["median"] = summarize_trainer(
            result["rows"], s.trainer_skip, micro, flop_per_sample
        )
        if run.cuda and result["memory"]:
            memory = torch.cuda.get_device_properties(run.device).total_memory / GIB
            section["plan_total_gib"] = plan_bytes(overrides, micro, memory) / GIB
        m = section["median"]
        if m:
            run.log(
                f"trainer: {section['status']}, micro batch {micro}: {m['step_s']:.3f} s/step, "
                f"data wait {m['data_wait_frac']:.1%}"
            )
        else:
            run.log(f"trainer: {section['status']}, no step logged")


def trainer_child(spec_path: str) -> int:
    """Inside the child: the real Trainer's fit() for the configured steps. Checkpoint writes
    are left out: d24's ZeRO-3 states (~30 GB with the EMA) would take minutes and fill the
    disk, and they are no part of a step."""
    import logging

    from mmdit.typed_config import load
    from training.config import RunConfig
    from training.trainer import Trainer

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s [rank 0] %(name)s: %(message)s",
        stream=sys.stderr,
    )

    class BenchTrainer(Trainer):
        def save_checkpoint(self) -> Path:
            return self.run_dir

    _exit_with_parent()
    spec = json.loads(Path(spec_path).read_text())
    config = load(RunConfig, spec["config"], spec["overrides"])
    code = BenchTrainer(config).fit()
    memory = {}
    if torch.cuda.is_available():
        memory = {
            "max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        }
    Path(spec["memory"]).write_text(json.dumps(memory))
    return code


def _exit_with_parent() -> None:
    """The child runs in a session of its own (so a timeout can kill it with its loader
    workers); if the benchmark itself is killed (a time limit on the node, a test's timeout),
    the child must not go on training alone on the GPU."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(4)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


# ---------------------------------------------------------------------------------------------
# Summary


def _ok(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e.get("status") == "ok"]


def summarize(report: dict) -> dict:
    """Headline numbers and the targets, from whatever the sections measured."""
    model = report.get("model", {})
    entries = _ok(model.get("entries", []))
    with_mfu = [e for e in entries if e.get("mfu") is not None]
    key = (lambda e: e["mfu"]) if with_mfu else (lambda e: e["tflops"])
    best = max(entries, key=key, default=None)
    default = default_config_entry(entries)
    trainer = report.get("trainer", {}).get("median") or {}
    buckets = model.get("buckets", {})
    attn = _ok(report.get("attention", {}).get("results", []))
    text_len = min((a["text_tokens"] for a in attn), default=None)
    best_attn = max(
        (a for a in attn if a["text_tokens"] == text_len),
        key=lambda a: a["fwd_bwd_tflops"],
        default=None,
    )

    def pick(e: dict | None) -> dict | None:
        if e is None:
            return None
        keys = ("compiled", "checkpointing", "batch", "median_s", "tflops", "mfu")
        return {k: e.get(k) for k in (*keys, "peak_allocated_gib")}

    best_mfu = best.get("mfu") if best else None
    default_mfu = default.get("mfu") if default else None
    gap = (
        100 * (best_mfu - default_mfu) if best_mfu is not None and default_mfu is not None else None
    )
    graphs = buckets.get("graphs_built")
    compile_s = [e["compile_s"] for e in entries if e.get("compile_s")]
    return {
        "device": report.get("environment", {}).get("device_name"),
        "sdpa_default_kernel": report.get("environment", {}).get("sdpa_default", {}).get("kernel"),
        "best_attention_backend": best_attn
        and {
            "backend": best_attn["backend"],
            "tokens": best_attn["tokens"],
            "fwd_bwd_tflops": best_attn["fwd_bwd_tflops"],
        },  # fmt: skip
        "model_best": pick(best),
        "model_default_config": pick(default),
        "first_compile_s": compile_s[0] if compile_s else None,
        "trainer_step": {
            k: trainer.get(k)
            for k in ("step_s", "samples_per_s", "tflops_per_s", "mfu", "data_wait_frac")
        }
        | {"micro_batch": report.get("trainer", {}).get("micro_batch")},
        "targets": [
            {
                "what": "MFU of the best model settings (forward+backward sweep)",
                "target": TARGETS["mfu_best"],
                "goal": TARGETS["mfu_best_goal"],
                "value": best_mfu,
                "met": None if best_mfu is None else best_mfu >= TARGETS["mfu_best"],
            },
            {
                "what": "points of MFU the default configs/d24_512px.yaml settings are below the "
                "best (forward+backward sweep)",
                "target": TARGETS["default_config_gap_points"],
                "value": gap,
                "met": None if gap is None else gap <= TARGETS["default_config_gap_points"],
            },
            {
                "what": f"graphs compiled across the {buckets.get('resolution')} px bucket set "
                "(first compile included)",
                "target": TARGETS["graphs_for_bucket_set"],
                "value": graphs,
                "met": None if graphs is None else graphs <= TARGETS["graphs_for_bucket_set"],
            },
            {
                "what": "MFU of the trainer step (its own formula; optimizer, EMA, ZeRO-3 and "
                "data included)",
                "target": TARGETS["mfu_best"],
                "value": trainer.get("mfu"),
                "met": None
                if trainer.get("mfu") is None
                else trainer["mfu"] >= TARGETS["mfu_best"],
            },
        ],
        "skipped": _skipped_notes(report),
    }


def default_config_entry(entries: list[dict]) -> dict | None:
    """The sweep entry with configs/d24_512px.yaml's settings: its checkpointing mode and
    compile flag, at its micro batch or the largest measured batch below it."""
    from mmdit.typed_config import load
    from training.config import RunConfig

    train = load(RunConfig, str(ROOT / CONFIG_FILE), []).train
    same = [
        e
        for e in entries
        if e["compiled"] == train.compile
        and e["checkpointing"] == train.activation_checkpointing
        and e["batch"] <= train.micro_batch_size
    ]
    return max(same, key=lambda e: e["batch"], default=None)


def _skipped_notes(report: dict) -> list[str]:
    notes = []
    for name, section in report.items():
        if isinstance(section, dict):
            notes += [f"{name}: {n}" for n in section.get("skipped", [])]
            for e in section.get("entries", []):
                if str(e.get("status", "")).startswith("skipped"):
                    notes.append(
                        f"{name} {'compiled' if e['compiled'] else 'eager'}/{e['checkpointing']}"
                        f"/b{e['batch']}: {e['status']}"
                    )
    return notes


def section_summary(run: Run, section: dict) -> None:
    section.update(summarize(run.report))
    for t in section["targets"]:
        value = t["value"]
        shown = "n/a" if value is None else f"{value:.3g}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        run.log(f"summary: {t['what']}: {shown} (target {t['target']}) {verdict}")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes (d2, batch 2) for a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="default: bench/results/gpu_<device>.json")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="time budget for the whole run; what does not fit is skipped with a note",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("attention", "gemm", "model", "trainer"),
        help="leave a section out (repeatable)",
    )
    p.add_argument("--trainer-child", help=argparse.SUPPRESS)  # internal: the trainer process
    return p.parse_args(argv)


def default_out(args: argparse.Namespace) -> Path:
    device = torch.device(args.device)
    slug = device_slug(flops.device_name(device), device.type)
    name = f"gpu_tiny_{slug}.json" if args.tiny else f"gpu_{slug}.json"
    return ROOT / "bench" / "results" / name


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.trainer_child:
        sys.exit(trainer_child(args.trainer_child))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu --tiny")
    out = args.out or default_out(args)
    run = Run(args, TINY if args.tiny else FULL, out)
    run.log(f"writing {out} (budget {args.budget_s:g} s)")
    sections: list[tuple[str, Callable[[Run, dict], None], float]] = [
        ("environment", section_environment, 0.0),
        ("attention", section_attention, 5.0),
        ("gemm", section_gemm, 5.0),
        ("model", sweep_part(1), 10.0),
        ("trainer", section_trainer, run.sizes.trainer_reserve_s / 2),
        ("model", sweep_part(2), 10.0),
    ]
    for name, fn, min_s in sections:
        if name in args.skip:
            run.report.setdefault(name, {})["skipped"] = ["skipped: --skip"]
            continue
        run_section(run, name, fn, min_s)
    run_section(run, "summary", section_summary, -math.inf)  # always: it only reads the report
    run.log(f"wrote {out}")
    return run.report


if __name__ == "__main__":
    main()
