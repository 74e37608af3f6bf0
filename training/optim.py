"""AdamW parameter groups and the learning-rate schedule.

Weight decay pulls weights towards zero; on norm scales, biases, embeddings and position
tables that is a bias, not a regulariser (DiT, SD3 and most LLM recipes exempt them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Norm scales and biases (all 1-D), embedding tables and position tables."""
    names = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the true shape here
            if len(shape) < 2 or isinstance(module, nn.Embedding) or "pos_embed" in name:
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    exempt = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": GROUP_NAMES[0]},
        {"params": no_decay, "weight_decay": 0.0, "name": GROUP_NAMES[1]},
    ]
    # DeepSpeed drops empty groups (a LoRA's adapters are all matrices: no no_decay group).
    return [g for g in groups if g["params"]]


GROUP_NAMES = ("decay", "no_decay")


def repair_after_load(optimizer, train: TrainConfig, names: tuple[str, ...] = GROUP_NAMES) -> None:
    """Undo two side effects of loading a DeepSpeed universal checkpoint (seen with 0.19):
    it copies group 0's settings onto every group (weight decay included), and it gives all
    groups one shared `step` tensor, which AdamW then increments once per group per update,
    so the bias correction of group 1 runs a step ahead. The group settings are rewritten
    from the config (a resumed run follows its config anyway) and the counters untied.
    `names`: the groups build_optimizer made, in order (empty ones are left out)."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    groups = optimizer.param_groups
    if len(groups) != len(names):
        raise RuntimeError(
            f"expected {len(names)} param groups, found {len(groups)} (built: {', '.join(names)})"
        )
    for group, name in zip(groups, names, strict=True):
        group["name"] = name
        group["weight_decay"] = train.weight_decay if name == "decay" else 0.0
        group["betas"] = tuple(train.betas)
        group["eps"] = train.eps


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device):
    # fused kernels exist for CUDA only; foreach is the fast path on the CPU, which is also
    # where the update runs when the optimizer is offloaded (train.offload_optimizer). There
    # torch's AdamW rather than DeepSpeed's CPU Adam: the latter computes its bias correction
    # by repeated multiplication but with pow() after a restart, so a resumed run drifts in
    # the last bits, and a resume must continue the same curve.
    fused = device.type == "cuda" and not train.offload_optimizer
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.lr,
        betas=tuple(train.betas),
        eps=train.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or
    cosine down to min_lr_ratio x lr at max_steps."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
