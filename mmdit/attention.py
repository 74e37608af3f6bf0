"""Attention kernels for the MMDiT: PyTorch SDPA (default) or xformers.

Both take q, k, v in the (B, N, H, Dh) layout that falls out of a fused qkv projection, so that no
head-major copy is made before the kernel; SDPA is handed transposed views and writes its output
back in the same token-major layout, which makes the final reshape to (B, N, H*Dh) free.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["sdpa", "xformers"]
BACKENDS: tuple[str, ...] = ("sdpa", "xformers")


def check_backend(backend: str) -> None:
    """Fail at model construction, not at the first step of a multi-hour job."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} is unknown; use one of {BACKENDS}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "attention_backend='xformers' needs the xformers package (pip install "
                "'mmdit-stack[gpu]' on a CUDA node); use attention_backend='sdpa' otherwise"
            ) from e
        if not torch.cuda.is_available():
            raise RuntimeError(
                "attention_backend='xformers' only runs on CUDA and no CUDA device is visible; "
                "use attention_backend='sdpa'"
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
    if backend == "xformers":
        if not q.is_cuda:
            raise RuntimeError(
                f"attention_backend='xformers' got tensors on {q.device}; move the model to "
                "CUDA or use attention_backend='sdpa'"
            )
        out = xformers_attention(q, k, v, key_mask)  # (B, Nq, H, Dh)
    else:
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Nk)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)  # (B, Nq, H, Dh), token-major in memory already
    return out.reshape(B, Nq, H * Dh)


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
