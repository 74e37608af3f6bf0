"""Attention kernels for the MMDiT, chosen by name (`model.attention_backend` in a run file).

    sdpa            PyTorch's scaled_dot_product_attention; PyTorch picks the kernel (default)
    sdpa_flash      SDPA restricted to its FlashAttention-2 kernel (CUDA; also the CPU kernel)
    sdpa_efficient  SDPA restricted to its memory-efficient (xformers-derived) kernel (CUDA)
    sdpa_cudnn      SDPA restricted to cuDNN's fused attention (CUDA, Hopper is fastest)
    sdpa_math       SDPA's reference math kernel (any device; for checks, not for speed)
    flash_attn      the flash-attn package's FA2 kernel (pip install flash-attn; CUDA)
    flash_attn_3    FlashAttention-3 from flash-attn's `hopper` build (flash_attn_interface; H100)
    xformers        xformers' memory_efficient_attention (pip install 'mmdit-stack[gpu]'; CUDA)

Every backend takes q, k, v in the (B, N, H, Dh) layout that falls out of a fused qkv projection,
so no head-major copy is made before the kernel: SDPA is handed transposed views and writes its
output back token-major, and flash-attn and xformers take that layout natively. The output
reshape to (B, N, H*Dh) is then free.

Packages are checked when a model is built (`check_backend`), devices and dtypes at the first
call, each failure with a message that names the backend and what to use instead.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionBackend = Literal[
    "sdpa",
    "sdpa_flash",
    "sdpa_efficient",
    "sdpa_cudnn",
    "sdpa_math",
    "flash_attn",
    "flash_attn_3",
    "xformers",
]
BACKENDS: tuple[str, ...] = AttentionBackend.__args__

# The SDPA kernel each restricted backend allows (None: PyTorch chooses).
_SDPA_KERNELS: dict[str, list[SDPBackend] | None] = {
    "sdpa": None,
    "sdpa_flash": [SDPBackend.FLASH_ATTENTION],
    "sdpa_efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "sdpa_cudnn": [SDPBackend.CUDNN_ATTENTION],
    "sdpa_math": [SDPBackend.MATH],
}
# Packages a backend imports, and how to get them.
_PACKAGES: dict[str, tuple[str, str]] = {
    "flash_attn": ("flash_attn", "pip install flash-attn --no-build-isolation (on a CUDA node)"),
    "flash_attn_3": (
        "flash_attn_interface",
        "build flash-attn's hopper/ directory (FlashAttention-3, H100/H200 only)",
    ),
    "xformers": ("xformers.ops", "pip install 'mmdit-stack[gpu]' (on a CUDA node)"),
}
_CUDA_ONLY = {"sdpa_efficient", "sdpa_cudnn", "flash_attn", "flash_attn_3", "xformers"}
_HALF_ONLY = {"flash_attn", "flash_attn_3"}  # their kernels take fp16/bf16 only


def check_backend(backend: str) -> None:
    """Fail at model construction, not at the first step of a multi-hour job."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} is unknown; use one of {BACKENDS}")
    if backend in _PACKAGES:
        module, how = _PACKAGES[backend]
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(
                f"attention_backend={backend!r} needs the {module.split('.')[0]} package "
                f"({how}); use attention_backend='sdpa' otherwise"
            ) from e


def _check_call(backend: str, q: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    if backend in _CUDA_ONLY and not q.is_cuda:
        raise RuntimeError(
            f"attention_backend={backend!r} only runs on CUDA, but the model runs on "
            f"{q.device}; use attention_backend='sdpa' there"
        )
    if backend in _HALF_ONLY and q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(
            f"attention_backend={backend!r} takes bf16/fp16 only, got {q.dtype}; train with "
            "train.precision=bf16 or use attention_backend='sdpa'"
        )
    if backend in ("flash_attn", "flash_attn_3") and key_mask is not None:
        raise ValueError(
            f"attention_backend={backend!r} takes no key mask (padding masks need its varlen "
            "API); use attention_backend='sdpa' for masked text"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(Dh).

    q: (B, Nq, H, Dh); k, v: (B, Nk, H, Dh). key_mask: (B, Nk) bool, True for keys that may be
    attended to. Returns (B, Nq, H * Dh).
    """
    B, Nq, H, Dh = q.shape
    if backend != "sdpa":
        _check_call(backend, q, key_mask)
    if backend == "xformers":
        out = xformers_attention(q, k, v, key_mask)  # (B, Nq, H, Dh)
    elif backend == "flash_attn":
        out = _flash_attn_func()(q, k, v)
    elif backend == "flash_attn_3":
        out = _flash_attn_3_func()(q, k, v)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
    else:
        out = sdpa(q, k, v, key_mask, _SDPA_KERNELS[backend])
    return out.reshape(B, Nq, H * Dh)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    kernels: list[SDPBackend] | None = None,
) -> torch.Tensor:
    """SDPA on (B, N, H, Dh) tensors -> (B, Nq, H, Dh), token-major in memory already."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Nk)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if kernels is None:
        return F.scaled_dot_product_attention(*args, attn_mask=mask).transpose(1, 2)
    try:
        with sdpa_kernel(kernels):
            return F.scaled_dot_product_attention(*args, attn_mask=mask).transpose(1, 2)
    except RuntimeError as e:
        if "No available kernel" not in str(e):
            raise
        raise RuntimeError(
            f"SDPA kernel {kernels[0].name} cannot run these inputs (device {q.device}, "
            f"{q.dtype}, head dim {q.shape[-1]}, mask {key_mask is not None}); use "
            "attention_backend='sdpa' to let PyTorch choose"
        ) from e


@functools.cache
def _flash_attn_func():
    from flash_attn import flash_attn_func

    return flash_attn_func


@functools.cache
def _flash_attn_3_func():
    from flash_attn_interface import flash_attn_func

    return flash_attn_func


def xformers_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """xformers' memory-efficient kernel on (B, N, H, Dh) inputs, the key mask as a bias."""
    import xformers.ops as xops

    bias = None
    if key_mask is not None:
        B, Nq, H, _ = q.shape
        Nk = k.shape[1]
        # xformers wants the bias' last dimension padded to a multiple of 8 in memory.
        padded = -(-Nk // 8) * 8
        bias = q.new_zeros(B, 1, 1, padded)
        bias[..., :Nk].masked_fill_(~key_mask[:, None, None, :], float("-inf"))
        bias = bias[..., :Nk].expand(B, H, Nq, Nk)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, Nq, H, Dh)
