"""LoRA fine-tuning: peft adapters on the MMDiT's Linear layers, the base frozen.

The trainer calls `add_lora` once, after the base weights exist (initialised or loaded by
train.init_from) and before deepspeed.initialize, so DeepSpeed sees the final module tree:
under ZeRO-3 the adapters (built here unpartitioned) are partitioned by deepspeed.initialize
like any late parameter, under ZeRO-1/2 they are replicated. Only the adapters require grad,
so the optimizer (training.optim.param_groups takes trainable parameters only), DeepSpeed's
fp32 master copies and the EMA cover the adapters alone: the optimizer state of a rank-r LoRA
is a few MB, and the base weights stay in the run's precision (bf16) without master copies.

Checkpoints keep peft's names (`...qkv.base_layer.weight`, `...qkv.lora_A.default.weight`);
mmdit.lora splits and merges them, `mmdit-export --format diffusers-lora` writes the
adapters for diffusers and `--merge-lora` writes merged weights.
"""

from __future__ import annotations

import logging
import re

import torch

from mmdit.model import MMDiT
from training.config import LORA_BLOCK_TARGETS, LoraConfig, RunConfig

log = logging.getLogger("mmdit.train")


def target_pattern(targets: tuple[str, ...]) -> str:
    """peft's target_modules as one regular expression over full module names (peft matches
    a string with re.fullmatch): block targets in both streams of every block."""
    block = [re.escape(t) for t in targets if t in LORA_BLOCK_TARGETS]
    top = [re.escape(t) for t in targets if t not in LORA_BLOCK_TARGETS]
    parts = []
    if block:
        parts.append(rf"blocks\.\d+\.(?:x|context)\.(?:{'|'.join(block)})")
    parts += top
    return "|".join(f"(?:{p})" for p in parts)


def add_lora(model: MMDiT, config: LoraConfig, seed: int) -> MMDiT:
    """Inject LoRA adapters into `model` in place (rank 0: nothing to do) and freeze the rest.

    Every rank draws the same A (seeded here), so replicated (ZeRO-1/2) and partitioned
    (ZeRO-3) runs start from the same adapters."""
    if not config.rank:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha or config.rank,
        lora_dropout=config.dropout,
        target_modules=target_pattern(config.targets),
        init_lora_weights=True if config.init == "default" else "gaussian",
        bias="none",
    )
    # peft draws the adapters in fp32 and casts them to the base layer's dtype: a ZeRO-3 model
    # built in bf16 rounds them here, a ZeRO-1/2 model when DeepSpeed casts it, so the
    # adapters start equal (and their fp32 master copies too) for every stage.
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(peft_config, model)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
        raise ValueError(
            f"lora.targets={list(config.targets)} matched no Linear layer of this model "
            "(attn2 exists only in model.dual_attention_layers); choose other targets"
        ) from None
    # With JointBlock as a ZeRO-3 leaf module (one gather per block, training.trainer) the
    # backward pass of a LoRA model fails on a still-partitioned (size 0) weight in DeepSpeed
    # 0.19 (seen on 2 gloo ranks and on 1); per-module gathering works, at one all-gather per
    # Linear instead of per block.
    from deepspeed.utils import unset_z3_leaf_modules

    from mmdit.model import JointBlock

    if any(getattr(m, "_z3_leaf", False) for m in model.modules()):
        unset_z3_leaf_modules(model, [JointBlock])
    log.info(lora_summary(model))
    return model


def lora_summary(model: torch.nn.Module) -> str:
    """How many parameters train, for the log."""

    def numel(p: torch.nn.Parameter) -> int:
        return getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps the true size there

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return f"LoRA: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"


def attach_frozen_base(ema, module: torch.nn.Module, run: RunConfig, rank: int) -> None:
    """Collective, once after deepspeed.initialize in a LoRA run with previews or validation:
    rank 0 keeps a CPU copy of the frozen base weights (in the run's precision) beside the EMA
    of the adapters, so that they (training.ema.gather_model) run base + EMA LoRA merged. The
    base never changes, so one gather serves the whole run."""
    config = run.lora
    evaluates = run.eval.val_every and run.eval.val_shards
    if not config.rank or not (run.train.preview_every or evaluates):
        return
    frozen = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3: partitioned; gather one tensor at a time
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0:
                    frozen[name] = p.detach().cpu().clone()
        elif rank == 0:
            frozen[name] = p.detach().cpu().clone()
    ema.frozen_base = frozen if rank == 0 else None
    ema.lora_scale = config.scale
