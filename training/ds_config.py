"""The DeepSpeed JSON, derived from the run config (never written by hand).

ZeRO-3 sizes follow the hidden size h, as the HF/DeepSpeed integration does: gradients are
reduced in buckets of h^2 elements, parameters are prefetched 0.9 h^2 at a time, and tensors
under 10 h elements (norm scales, biases) stay whole on every rank, since gathering them costs
more than storing them.
"""

from __future__ import annotations

from typing import Any

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
    h = config.model.hidden_size
    accumulation = accumulation_steps(train, world_size)
    return {
        "train_batch_size": train.micro_batch_size * accumulation * world_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            "contiguous_gradients": True,
            "overlap_comm": True,
            "reduce_bucket_size": h * h,
            "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        # Our AdamW (torch's) carries the param groups; DeepSpeed wraps it.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
