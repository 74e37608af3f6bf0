"""The DeepSpeed JSON, derived from the run config (never written by hand).

Bucket sizes follow the model's unit of work, one joint block (B parameters, ~36 h^2): ZeRO-3
gathers a block at a time (the trainer makes each block a ZeRO leaf module), so it prefetches
B parameters, i.e. the whole next block while this one computes; gradients are reduced and
(stages 1-2) weights all-gathered in buckets of B elements; tensors under 10 h elements (norm
scales, biases) stay whole on every rank, since gathering them costs more than storing them.

With several data.resolutions the micro batches differ in size (data_pipeline.buckets.
micro_batch_for); train_micro_batch_size_per_gpu and train_batch_size then count samples of the
smallest resolution. DeepSpeed only books them: the trainer draws `accumulation` micro batches
per step and calls backward/step itself, and each micro batch's mean loss weighs the same
(they carry about the same number of tokens).

`memory_efficient_linear` is off: under zero.Init DeepSpeed otherwise replaces
torch.nn.functional.linear for the whole process (and never restores it) with a Python
autograd.Function that runs matmul and bias add separately, slower and opaque to
torch.compile; it only saves memory for linears whose weights are shared across calls.
"""

from __future__ import annotations

from typing import Any

from mmdit.flops import largest_block_params
from training.config import RunConfig, TrainConfig


def accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """Micro batches per optimizer step so micro x accumulation x world = the global batch."""
    if not train.global_batch_size:
        return 1
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"micro_batch_size x world size = {train.micro_batch_size} x {world_size}; "
            "change the global batch, the micro batch or the number of ranks"
        )
    return train.global_batch_size // per_step


def global_batch(train: TrainConfig, world_size: int) -> int:
    return train.micro_batch_size * accumulation_steps(train, world_size) * world_size


def deepspeed_config(
    config: RunConfig, world_size: int, *, load_universal: bool = False
) -> dict[str, Any]:
    train = config.train
    accumulation = accumulation_steps(train, world_size)
    return {
        "train_batch_size": train.micro_batch_size * accumulation * world_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero_section(config),
        # Our AdamW (torch's) carries the param groups, also on the CPU under offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def zero_section(config: RunConfig) -> dict[str, Any]:
    train = config.train
    h = config.model.hidden_size
    block = largest_block_params(config.model)
    zero: dict[str, Any] = {
        "stage": train.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_bucket_size": block,
        "memory_efficient_linear": False,
    }
    if train.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": block,
            "stage3_param_persistence_threshold": 10 * h,
            "stage3_max_live_parameters": max(1_000_000_000, 3 * block),
            "stage3_max_reuse_distance": max(1_000_000_000, 3 * block),
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    else:
        zero["allgather_bucket_size"] = block
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero
