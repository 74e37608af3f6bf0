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
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device):
    # fused kernels exist for CUDA only; foreach is the fast path on the CPU.
    fused = device.type == "cuda"
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
