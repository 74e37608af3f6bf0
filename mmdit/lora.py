"""LoRA weights as plain tensors: split a peft-wrapped MMDiT state dict, merge a LoRA into it.

A LoRA-trained run's weights carry peft's names (training.lora injects the adapters with
peft): a wrapped Linear `m` has `m.base_layer.{weight,bias}` (the frozen base) and
`m.lora_A.default.weight` (r, in) and `m.lora_B.default.weight` (out, r); its output is
base(x) + scale * B(A(x)) with scale = alpha / rank. Nothing here imports peft: readers of
checkpoints (eval, mmdit-export) need the arithmetic only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ADAPTER = "default"  # peft's adapter name; the trainer injects one adapter
_BASE = ".base_layer."
_A = f".lora_A.{ADAPTER}.weight"
_B = f".lora_B.{ADAPTER}.weight"

Lora = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))


def scale(rank: int, alpha: float) -> float:
    """peft's scale alpha / rank; alpha 0 means alpha = rank (scale 1)."""
    return (alpha or rank) / rank


def has_lora(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(_A) for k in state_dict)


def split(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Lora]:
    """A peft-wrapped state dict -> (the plain MMDiT state dict of the base weights, the LoRA
    per module). A state dict without adapters comes back as it is, with no LoRA."""
    base: dict[str, torch.Tensor] = {}
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_A):
            a[key[: -len(_A)]] = value
        elif key.endswith(_B):
            b[key[: -len(_B)]] = value
        else:
            base[key.replace(_BASE, ".")] = value
    if a.keys() != b.keys():
        odd = sorted(a.keys() ^ b.keys())
        raise ValueError(f"LoRA weights without their other half (lora_A or lora_B): {odd[:5]}")
    return base, {m: (a[m], b[m]) for m in sorted(a)}


def merge(base: Mapping[str, torch.Tensor], lora: Lora, scale: float) -> dict[str, torch.Tensor]:
    """base + scale * B @ A for every adapted module, computed in fp32 and returned in the base
    weight's dtype."""
    out = dict(base)
    for module, (a, b) in lora.items():
        key = f"{module}.weight"
        if key not in out:
            raise ValueError(f"LoRA on {module}, which has no {key} in the base weights")
        w = out[key]
        out[key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def scaled(lora: Lora, scale: float) -> Lora:
    """The same LoRA with its scale folded into B (B' = scale * B), so that B' @ A is the
    whole update: what a loader that assumes alpha = rank (diffusers without alphas) needs."""
    return {m: (a.float(), b.float() * scale) for m, (a, b) in lora.items()}
