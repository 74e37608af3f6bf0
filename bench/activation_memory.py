"""Activation memory of the MMDiT per token, per joint block and checkpointing mode: measures
the table `training/activation_memory.json` that `mmdit-plan` (training/memory_plan.py) reads.

    .venv/bin/python bench/activation_memory.py               # ~1 min on 2 CPU cores
    .venv/bin/python bench/activation_memory.py --out /tmp/activation_memory.json

For each block kind (joint; last = the context_pre_only block; dual = a block with SD3.5's
second image attention), checkpointing mode (none, attention, mlp, block) and QK-norm setting:

stored          bytes saved for the backward pass (torch.autograd.graph.saved_tensors_hooks, each
                storage once, parameters left out: they are model states). The block runs in
                bf16 on fake CUDA tensors (FakeTensorMode: shapes, dtypes and CUDA dispatch, no
                memory and no GPU needed) with SDPA pinned to its flash kernel, so the saved set
                is a GPU's: LayerNorm statistics in fp32, the fused CUDA RMSNorm (input + fp32
                rstd), flash attention's output and logsumexp instead of an N x N matrix.
backward_extra  the most bytes alive during the block's backward pass beyond its stored bytes:
                what a checkpointed part recomputes, the incoming and outgoing activation
                gradients and the backward ops' temporaries; per token of either stream, the
                larger of a nearly-all-image and a nearly-all-text sequence (an upper bound for
                any mix: the peak is the largest of several phases, so it is convex in the mix).
                Fake tensors cannot run a CUDA backward, so this is measured for real on the
                CPU in bf16: a TorchDispatchMode follows every tensor an op creates until it is
                freed; RMSNorm is replaced by a stand-in that saves what the fused CUDA kernel
                saves (the CPU's composite RMSNorm keeps two fp32 copies of q and k instead).
                Workspaces allocated inside a kernel (FlashAttention-2's fp32 dq accumulator)
                are invisible here; the planner adds that one.

At SD3's shape rule (head dim 64, MLP ratio 4) both are linear in the tokens and in the width:
bytes per token and sample = per_hidden x hidden + constant. Stored bytes have separate image
and text coefficients (the last block has no text output path, dual blocks a second image-only
attention), solved exactly from 2 widths x 2 image/text splits; backward_extra one per-token
pair from 2 widths. Both are then checked against a measurement at a third width, image/text
split and batch (`checks`). `outside` is what the rest of a training step stores:
patch/timestep/pooled/context embedders, final layer, unpatchify and the fp32 loss of
`mmdit.flow.training_loss` (from an MMDiT of depth 2, attributed to the blocks or not by
forward hooks). `cpu_cross_check` compares the stored bytes of real CPU runs with the
fake CUDA ones: SDPA's CPU flash kernel also keeps out + logsumexp, not the N x N matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import platform
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import mmdit.model as mmdit_model  # noqa: E402
from mmdit import flow  # noqa: E402
from mmdit.model import JointBlock, MMDiT, MMDiTConfig  # noqa: E402

DEFAULT_OUT = ROOT / "training" / "activation_memory.json"
KINDS = ("joint", "last", "dual")
MODES = ("none", "attention", "mlp", "block")
QK_NORMS = ("none", "rms_norm")
HEAD_DIM = 64
BATCH = 2
# Stored bytes under fake CUDA tensors cost nothing, so they are taken at real widths and
# sequence lengths; backward peaks run for real on the CPU, so at small ones.
STORED_WIDTHS = (1024, 2048)
STORED_SPLITS = ((4096, 256), (1024, 1024))  # (image tokens, text tokens)
STORED_CHECK = (1536, (1024, 154), 4)  # d24 at 512 px, 4 samples: width, split, batch
PEAK_WIDTHS = (128, 256)
# Nearly all image and nearly all text: the backward peak is the largest of several phases
# (each stream's MLP backward, the joint attention backward), so the bytes per token are
# convex in the image/text mix and these two ends bound every mix in between.
PEAK_SPLITS = ((496, 16), (16, 496))
PEAK_CHECK = (192, (144, 40), 3)


# --------------------------------------------------------------------------------------------
# Counting bytes
# --------------------------------------------------------------------------------------------


def storage_key(t: torch.Tensor) -> int:
    # The StorageImpl's address: views share it, and fake tensors (whose data_ptr is 0) have
    # distinct ones.
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def saved_bytes(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Bytes saved for backward inside the block, by storage; storages in `exclude` left out."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in exclude:
            storages[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


class LiveBytes(TorchDispatchMode):
    """Bytes of all tensors created by ops while active and not yet freed, and their peak."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.known = set(ignore)  # storages not to count (parameters, inputs)
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.known:
            return
        self.known.add(key)
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.known.discard(key)
        self.current -= size


# --------------------------------------------------------------------------------------------
# What a GPU runs, emulated where the CPU differs
# --------------------------------------------------------------------------------------------


def flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA's FlashAttention-2 kernel, called directly: fake tensors cannot ask the device
    which kernels it supports, and SDPA would fall back to its math kernel."""
    if attn_mask is not None or dropout_p or is_causal:
        raise ValueError("the measurement runs unmasked, dropout-free, non-causal attention")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]


class FusedRMSNormStandIn(torch.autograd.Function):
    """RMSNorm that saves what CUDA's aten::_fused_rms_norm saves: the input and fp32 rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return (x.float() * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        x_hat = x.float() * rstd
        g = grad.float() * weight.float()
        grad_x = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        grad_w = (grad.float() * x_hat).sum(dim=tuple(range(x.ndim - 1)))
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


def fused_rms_norm(input, normalized_shape, weight=None, eps=None):
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    return FusedRMSNormStandIn.apply(input, weight, eps)


@contextlib.contextmanager
def bf16_on(device: str) -> Iterator[None]:
    """Modules and factory tensors created inside are bf16 on `device` (no fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def gpu_emulation(fake_cuda: bool) -> Iterator[None]:
    """Fake CUDA tensors with flash SDPA, or the CPU with a fused-RMSNorm stand-in."""
    # Checkpointing would save CUDA RNG states, which needs a real device; they are tiny.
    no_rng = functools.partial(checkpoint, preserve_rng_state=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(mmdit_model, "checkpoint", no_rng))
        if fake_cuda:
            stack.enter_context(FakeTensorMode())
            stack.enter_context(
                mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", flash_sdpa)
            )
        else:
            stack.enter_context(mock.patch.object(torch.nn.functional, "rms_norm", fused_rms_norm))
        stack.enter_context(bf16_on("cuda" if fake_cuda else "cpu"))
        yield


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def model_config(hidden: int, qk_norm: str, depth: int = 2, **kw) -> MMDiTConfig:
    return MMDiTConfig(
        depth=depth, hidden_size=hidden, num_heads=hidden // HEAD_DIM, qk_norm=qk_norm, **kw
    )


def make_block(config: MMDiTConfig, kind: str) -> JointBlock:
    return JointBlock(config, context_pre_only=kind == "last", dual_attention=kind == "dual")


def run_block(block: JointBlock, mode: str, x, ctx, c):
    """The block as MMDiT.forward runs it in `mode` (block mode wraps the whole call)."""
    block.checkpoint_part = "none" if mode == "block" else mode
    if mode == "block":
        return mmdit_model.checkpoint(block, x, ctx, c, None, use_reentrant=False)
    return block(x, ctx, c, None)


def block_inputs(hidden: int, n_img: int, n_txt: int, batch: int):
    def leaf(*shape):
        return torch.randn(*shape).requires_grad_()

    return leaf(batch, n_img, hidden), leaf(batch, n_txt, hidden), leaf(batch, hidden)


def measure_stored(hidden, kind, mode, qk_norm, n_img, n_txt, batch) -> int:
    """Bytes a GPU saves for backward in one block (fake CUDA tensors)."""
    with gpu_emulation(fake_cuda=True):
        block = make_block(model_config(hidden, qk_norm), kind)
        x, ctx, c = block_inputs(hidden, n_img, n_txt, batch)
        with saved_bytes({storage_key(p) for p in block.parameters()}) as saved:
            run_block(block, mode, x, ctx, c)
    return sum(saved.values())


def measure_cpu(hidden, kind, mode, qk_norm, n_img, n_txt, batch) -> tuple[int, int]:
    """(stored, backward peak) of one block, for real on the CPU in bf16."""
    torch.manual_seed(0)
    with gpu_emulation(fake_cuda=False):
        block = make_block(model_config(hidden, qk_norm), kind)
        # ZeRO moves a weight gradient into its reduce bucket as soon as it is complete.
        for p in block.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        x, ctx, c = block_inputs(hidden, n_img, n_txt, batch)
        params = {storage_key(p) for p in block.parameters()}
        inputs = {storage_key(t): t.untyped_storage().nbytes() for t in (x, ctx, c)}
        with LiveBytes(ignore=params | set(inputs)) as live:
            with saved_bytes(params) as saved:
                outputs = [t for t in run_block(block, mode, x, ctx, c) if t is not None]
            grads = [torch.ones_like(t) for t in outputs]
            live.reset_peak()
            torch.autograd.backward(outputs, grads)
        # The inputs are this block's stored activations; its outputs are the next block's.
        output_bytes = sum(t.untyped_storage().nbytes() for t in outputs)
        peak = live.peak + sum(inputs.values()) - output_bytes
    return sum(saved.values()), peak


def measure_outside(hidden, n_img, n_txt, batch, fake_cuda: bool = True) -> int:
    """Bytes a training step stores outside the joint blocks (embedders, final layer, loss)."""
    side = int(round(n_img**0.5))
    if side * side != n_img:
        raise ValueError(f"image tokens {n_img} must be a square number here")
    config = model_config(hidden, "none", pos_embed_max_size=side, sample_size=2 * side)
    with gpu_emulation(fake_cuda):
        model = MMDiT(config, initialize=False)
        owner = ["outside"]
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_: owner.__setitem__(0, "block"))
            block.register_forward_hook(lambda *_: owner.__setitem__(0, "outside"))
        x0 = torch.randn(batch, 16, 2 * side, 2 * side, dtype=torch.float32)
        noise = torch.randn_like(x0)
        context = torch.randn(batch, n_txt, config.context_dim)
        pooled = torch.randn(batch, config.pooled_dim)
        sigma = torch.rand(batch, dtype=torch.float32)
        params = {storage_key(p) for p in model.parameters()}
        outside: dict[int, int] = {}
        seen: set[int] = set(params)

        def pack(t):
            key = storage_key(t)
            if key not in seen:  # the first saver owns a storage
                seen.add(key)
                if owner[0] == "outside":
                    outside[key] = t.untyped_storage().nbytes()
            return t

        def model_fn(x, s, ctx, pool):  # as the trainer calls the DeepSpeed engine
            return model(x.to(torch.bfloat16), s, ctx.to(torch.bfloat16), pool.to(torch.bfloat16))

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = flow.training_loss(
                model_fn, x0, context=context, pooled=pooled, sigma=sigma, noise=noise
            )
            loss.mean()
    return sum(outside.values())


# --------------------------------------------------------------------------------------------
# Fitting: bytes / batch = n_img (a_i h + b_i) + n_txt (a_t h + b_t)
# --------------------------------------------------------------------------------------------


def solve(widths, splits, batch, measure) -> dict[str, dict[str, float]]:
    rows, values = [], []
    for h in widths:
        for n_img, n_txt in splits:
            rows.append([n_img * h, n_img, n_txt * h, n_txt])
            values.append(measure(h, n_img, n_txt) / batch)
    a_i, b_i, a_t, b_t = torch.linalg.solve(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    ).tolist()
    return {
        "image": {"per_hidden": round(a_i, 6), "constant": round(b_i, 3)},
        "text": {"per_hidden": round(a_t, 6), "constant": round(b_t, 3)},
    }


def solve_envelope(widths, splits, batch, measure) -> dict[str, float]:
    """Per token of either stream: the largest bytes per token over `splits`, at each width."""
    rates = [
        max(measure(h, n_img, n_txt) / (batch * (n_img + n_txt)) for n_img, n_txt in splits)
        for h in widths
    ]
    (h0, h1), (r0, r1) = widths, rates
    per_hidden = (r1 - r0) / (h1 - h0)
    return {"per_hidden": round(per_hidden, 6), "constant": round(r0 - per_hidden * h0, 3)}


def predict(coefs: dict, hidden: int, n_img: int, n_txt: int, batch: int) -> float:
    def per_token(c):
        return c["per_hidden"] * hidden + c["constant"]

    if "image" not in coefs:  # one rate for the tokens of both streams
        return batch * (n_img + n_txt) * per_token(coefs)
    return batch * (n_img * per_token(coefs["image"]) + n_txt * per_token(coefs["text"]))


def check(what, coefs, hidden, n_img, n_txt, batch, measured, known=0) -> dict:
    """Prediction (+ a measured part `known`) against a measurement at an uncalibrated size."""
    predicted = known + predict(coefs, hidden, n_img, n_txt, batch)
    return {
        "what": what,
        "hidden": hidden,
        "tokens": [n_img, n_txt],
        "batch": batch,
        "measured": measured,
        "predicted": round(predicted),
        "relative_error": round((predicted - measured) / measured, 5),
    }


# --------------------------------------------------------------------------------------------


def provenance(seconds: float) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "command": "python bench/activation_memory.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "CPU only: stored bytes from CUDA dispatch on fake tensors (no GPU), "
        "backward peaks from real bf16 runs on the CPU",
        "seconds": round(seconds, 1),
    }


def measure_table(log=print) -> dict:
    start = time.perf_counter()
    blocks: dict = {}
    checks: list[dict] = []
    for qk in QK_NORMS:
        for kind in KINDS:
            for mode in MODES:
                log(f"  qk_norm={qk:8s} {kind:5s} {mode}")

                def stored(h, n_img, n_txt, batch=BATCH, kind=kind, mode=mode, qk=qk):
                    return measure_stored(h, kind, mode, qk, n_img, n_txt, batch)

                def extra(h, n_img, n_txt, batch=BATCH, kind=kind, mode=mode, qk=qk):
                    saved, peak = measure_cpu(h, kind, mode, qk, n_img, n_txt, batch)
                    return peak - saved

                entry = {
                    "stored": solve(STORED_WIDTHS, STORED_SPLITS, BATCH, stored),
                    "backward_extra": solve_envelope(PEAK_WIDTHS, PEAK_SPLITS, BATCH, extra),
                }
                blocks.setdefault(qk, {}).setdefault(kind, {})[mode] = entry
                h, (n_img, n_txt), b = STORED_CHECK
                checks.append(
                    check(
                        f"stored qk_norm={qk} {kind} {mode}",
                        entry["stored"],
                        h,
                        n_img,
                        n_txt,
                        b,
                        stored(h, n_img, n_txt, b),
                    )
                )
                # The backward extra matters next to the stored bytes: check the block's peak.
                h, (n_img, n_txt), b = PEAK_CHECK
                saved, peak = measure_cpu(h, kind, mode, qk, n_img, n_txt, b)
                checks.append(
                    check(
                        f"backward peak qk_norm={qk} {kind} {mode}",
                        entry["backward_extra"],
                        h,
                        n_img,
                        n_txt,
                        b,
                        peak,
                        known=saved,
                    )
                )
    log("  outside the blocks")

    def outside_fn(h, n_img, n_txt, batch=BATCH):
        return measure_outside(h, n_img, n_txt, batch)

    outside = solve(STORED_WIDTHS, STORED_SPLITS, BATCH, outside_fn)
    h, (n_img, n_txt), b = STORED_CHECK
    checks.append(
        check("outside stored", outside, h, n_img, n_txt, b, outside_fn(h, n_img, n_txt, b))
    )
    log("  CPU cross-check")
    cross = []
    h, (n_img, n_txt), b = PEAK_CHECK
    for kind in KINDS:
        for mode in MODES:
            cuda = measure_stored(h, kind, mode, "none", n_img, n_txt, b)
            cpu, _ = measure_cpu(h, kind, mode, "none", n_img, n_txt, b)
            cross.append(
                {
                    "what": f"stored qk_norm=none {kind} {mode}",
                    "hidden": h,
                    "tokens": [n_img, n_txt],
                    "batch": b,
                    "cpu": cpu,
                    "fake_cuda": cuda,
                    "cpu_over_cuda": round(cpu / cuda, 5),
                }
            )
    return {
        "description": (
            "Activation bytes of the MMDiT per token and sample (bench/activation_memory.py "
            "docstring): blocks[qk_norm][kind][mode].stored = saved for backward by one "
            "block; .backward_extra = the most bytes alive beyond that during its backward; "
            "outside.stored = embedders, final layer and loss. Each as per_hidden x "
            "hidden_size + constant, for image and text tokens."
        ),
        "provenance": provenance(time.perf_counter() - start),
        "shape_rule": {
            "head_dim": HEAD_DIM,
            "mlp_ratio": 4.0,
            "patch_size": 2,
            "in_channels": 16,
            "context_dim": 4096,
            "pooled_dim": 2048,
            "precision": "bf16",
            "attention": "flash (SDPA, flash_attn, xformers and cuDNN save the same)",
        },
        "calibration": {
            "batch": BATCH,
            "stored": {"hidden": STORED_WIDTHS, "tokens": STORED_SPLITS},
            "backward_extra": {"hidden": PEAK_WIDTHS, "tokens": PEAK_SPLITS},
        },
        "blocks": blocks,
        "outside": {"stored": outside},
        "checks": checks,
        "cpu_cross_check": cross,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("measuring activation bytes per token (fake CUDA stored, CPU backward peaks)")
    table = measure_table()
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    stored = [abs(c["relative_error"]) for c in table["checks"] if "peak" not in c["what"]]
    peaks = [c["relative_error"] for c in table["checks"] if "peak" in c["what"]]
    print(
        f"wrote {args.out} ({table['provenance']['seconds']} s): stored bytes within "
        f"{max(stored):.2%} of the checks; one block's backward peak over-estimated by "
        f"{min(peaks):.0%} to {max(peaks):.0%} (an upper bound)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
