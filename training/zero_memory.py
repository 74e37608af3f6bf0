"""The model states' memory per GPU under ZeRO (weights, gradients, fp32 master weights and
Adam moments as the stage partitions them, and ZeRO-3's gathered blocks in flight): DeepSpeed's
own estimators where they exist, the same accounting written out where they do not. Part of
mmdit-plan (training/memory_plan.py)."""

from __future__ import annotations

import math

from mmdit.flops import block_param_counts, largest_block_params, param_counts
from training.activation_memory import checkpoint_modes
from training.config import RunConfig

DS_BUFFER_FACTOR = 1.5  # DeepSpeed's default additional_buffer_factor (host memory only)


def zero_model_states(config: RunConfig, world: int) -> tuple[int, str]:
    """(bytes per GPU, where the number comes from): DeepSpeed's estimator where one exists."""
    train = config.train
    params = param_counts(config.model)["total"]
    block = largest_block_params(config.model)
    nodes, per_node = node_layout(config, world)
    # DeepSpeed's stage-3 estimator knows parameter offload only together with optimizer offload.
    estimated = train.offload_optimizer or not train.offload_params
    if train.precision == "bf16" and train.zero_stage == 3 and estimated:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            params,
            block,
            per_node,
            nodes,
            cpu_offload=train.offload_optimizer,
            cpu_offload_params=train.offload_params,
            zero_init=True,
            additional_buffer_factor=DS_BUFFER_FACTOR,
        )
        per_param = 18 if not train.offload_optimizer else (0 if train.offload_params else 2)
        return gpu, (
            f"DeepSpeed estimate_zero3_model_states_mem_needs: {per_param} B x "
            f"{params / 1e6:.0f}M parameters / {world} GPUs + 4 B x the largest block "
            f"({block / 1e6:.0f}M)"
        )
    if train.precision == "bf16" and train.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(
            params, per_node, nodes, train.offload_optimizer, DS_BUFFER_FACTOR
        )
        per_param = "2 B x P" if train.offload_optimizer else "2 B x P + 18 B x P / N"
        return gpu, (
            f"DeepSpeed estimate_zero2_model_states_mem_needs: {per_param} (P = "
            f"{params / 1e6:.0f}M parameters, N = {world} GPUs)"
        )
    return written_out_model_states(config, world), (
        f"no DeepSpeed estimator for ZeRO-{train.zero_stage} {train.precision}"
        + (" with params offloaded alone" if train.offload_params else "")
        + f": {written_out_rule(config)}"
    )


def written_out_model_states(config: RunConfig, world: int) -> int:
    """DeepSpeed's accounting written out for any stage, precision and offload.

    Per parameter, with w = 2 bytes (bf16) or 4 (fp32) for the model's own copies: weights w
    and gradients w, plus the optimizer's fp32 gradient copy 4, fp32 master weights 4 and Adam
    moments 8 (16 bytes, on the CPU when the optimizer is offloaded). ZeRO-1 partitions the
    optimizer's 16, ZeRO-2 also the gradients, ZeRO-3 also the weights (+ one gathered block's
    weights and gradients, 2 w x the block). At w = 2 this is DeepSpeed's estimators exactly:
    stage 2: 2 P + 18 P / N (2 P with offload); stage 3: 4 B + 18 P / N (4 B + 2 P / N with
    optimizer offload, 4 B with parameter offload too).
    """
    train = config.train
    p = param_counts(config.model)["total"]
    block = largest_block_params(config.model)
    w = 2 if train.precision == "bf16" else 4
    optimizer = 0 if train.offload_optimizer else 16
    if train.zero_stage == 1:
        # ZeRO-1 keeps every gradient whole until the optimizer step, offloaded or not.
        return w * p + w * p + math.ceil(optimizer * p / world)
    if train.zero_stage == 2:
        grads = 0 if train.offload_optimizer else w  # offloaded with the optimizer's partition
        return w * p + math.ceil((grads + optimizer) * p / world)
    weights = 0 if train.offload_params else w
    # ZeRO-3 reduces each block's gradients straight into the optimizer's fp32 partition.
    return 2 * w * block + math.ceil((weights + optimizer) * p / world)


def written_out_rule(config: RunConfig) -> str:
    w = 2 if config.train.precision == "bf16" else 4
    return (
        f"weights {w} B + gradients {w} B + fp32 gradient copy, master weights and Adam "
        "16 B per parameter, partitioned as the stage partitions them"
    )


def node_layout(config: RunConfig, world: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for DeepSpeed's estimators, from launch when it matches."""
    per_node = config.launch.gpus_per_node
    if world % per_node == 0:
        return world // per_node, per_node
    return 1, world


def host_bytes_per_node(config: RunConfig, world: int) -> int:
    """DeepSpeed's CPU-memory estimate per node (with its 1.5x buffer), plus our offloaded EMA."""
    train = config.train
    params = param_counts(config.model)["total"]
    nodes, per_node = node_layout(config, world)
    if train.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, _, _ = estimate_zero3_model_states_mem_needs(
            params,
            largest_block_params(config.model),
            per_node,
            nodes,
            cpu_offload=train.offload_optimizer,
            cpu_offload_params=train.offload_params and train.offload_optimizer,
            zero_init=True,
            additional_buffer_factor=DS_BUFFER_FACTOR,
        )
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, _ = estimate_zero2_model_states_mem_needs(
            params, per_node, nodes, train.offload_optimizer, DS_BUFFER_FACTOR
        )
    ema = 4 * params * per_node / world if train.offload_optimizer else 0
    return int(cpu + ema)


def blocks_in_flight(config: RunConfig, zero: dict, mode: str, every: int) -> int:
    """Gathered blocks beyond the one computing when the backward pass starts: the prefetched
    next block, plus the blocks DeepSpeed did not release after their forward because each
    comes back within stage3_max_reuse_distance parameters of module calls (the later blocks'
    forward, the final layer both ways, the later blocks' backward and, in block mode, their
    recomputation)."""
    model = config.model
    reuse = zero["stage3_max_reuse_distance"]
    modes = checkpoint_modes(model.depth, mode, every)
    distance = 2 * param_counts(model)["final_layer"]
    kept = 0
    for i in reversed(range(model.depth)):
        if distance >= reuse:
            break
        kept += 1
        distance += sum(block_param_counts(model, i)) * (3 if modes[i] == "block" else 2)
    # DeepSpeed's estimate already holds one gathered block (the one computing); the prefetched
    # next one takes its place in the count when none is kept.
    return max(kept, 1)
