"""`mmdit-plan`: the GPU memory a training run needs per GPU, checked before it is submitted.

    mmdit-plan --config configs/d24_512px.yaml                      # the table and the verdict
    mmdit-plan --config configs/d24_256px.yaml --gpu h200           # another card
    mmdit-plan --config configs/d24_512px.yaml launch.nodes=2 train.micro_batch_size=16
    mmdit-plan --config configs/d24_512px.yaml --json               # for machines

Exit status 0 when the run fits, 2 when it does not: then one line says what to change (the
micro batch, the checkpointing mode, the ZeRO stage or offload, more GPUs). Usage and config
errors also exit 2, with `error:` and the file and key at fault.

What it counts, per GPU, at the peak of a training step (the start of the backward pass):

  model states   bf16 weights and gradients, fp32 master weights and Adam moments, as ZeRO
                 partitions them over the world size (launch.nodes x launch.gpus_per_node).
                 DeepSpeed's own estimators give stages 2 and 3 in bf16; stage 1, fp32 and
                 parameter offload without optimizer offload are the same accounting written
                 out (the table says which). Plus what they leave out: this trainer's
                 shard-local fp32 EMA (4 bytes per parameter / world; on the CPU with the
                 optimizer when that is offloaded), ZeRO-3's gathered blocks in flight (the
                 prefetched next block, and the last blocks DeepSpeed keeps gathered between
                 their forward and backward because they are reused within
                 stage3_max_reuse_distance parameters) and the gradient reduce buckets.
  activations    from a measured table (training/activation_memory.json, made by
                 bench/activation_memory.py): bytes saved for backward per token, per joint
                 block and checkpointing mode, linear in the width; the block inputs a
                 checkpointed block keeps; what the embedders, final layer and loss store; the
                 backward's working memory (one block's recomputed activations and gradients at
                 a time, plus FlashAttention's fp32 dq accumulator); the batch tensors. Tokens
                 per sample: the largest aspect bucket's image tokens (resolution/16 squared for
                 square ones) plus 77 CLIP + conditioning.t5_max_length T5 text tokens.
  overhead       CUDA context 1.0 GiB, NCCL and cuBLAS workspaces 0.5 GiB, and a 10% margin on
                 everything else for the caching allocator's fragmentation (aspect buckets
                 change the sequence length from batch to batch).

What it does not count: memory outside the training step (validation, preview sampling,
checkpoint saving all run with the step's activations freed), the frozen VAE and text encoders
when training reads raw images instead of cache shards, torch.compile's own choices
(train.compile: usually it saves less), optimizer-step transients (the fp32 gradient copy at the
step, when activations are already freed), host memory beyond DeepSpeed's estimate.

How accurate: the stored activations match a saved_tensors_hooks measurement of a real MMDiT
within 0.5% at sizes the table was not calibrated on, and the activation peak lies 3-13% above
a real CPU step's measured peak (tests/training/test_memory_plan.py: the backward working
memory is an upper bound by construction). Model states are DeepSpeed's own formulas. The whole
has not yet been compared with torch.cuda.max_memory_reserved on a GPU; expect it within ~10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.buckets import bucket_families, micro_batch_for
from mmdit.flops import block_param_counts, largest_block_params, param_counts
from mmdit.model import MMDiTConfig
from mmdit.typed_config import add_config_arguments, config_from_args
from training.config import RunConfig
from training.ds_config import accumulation_steps, zero_section

GIB = 2**30
# Memory of one GPU by name (GiB as the card is sold; the CUDA context line below covers what
# the driver keeps). `--gpu-memory` or launch.gpu_memory_gb for anything else.
GPUS: dict[str, float] = {
    "h100": 80,
    "h200": 141,
    "a100-80": 80,
    "a100-40": 40,
    "l40s": 48,
    "b200": 180,
}
CUDA_CONTEXT_BYTES = 1 * GIB
LIBRARY_WORKSPACE_BYTES = GIB // 2  # NCCL communicator buffers, cuBLAS workspaces
ALLOCATOR_MARGIN = 0.10
DS_BUFFER_FACTOR = 1.5  # DeepSpeed's default additional_buffer_factor (host memory only)
CLIP_TOKENS = 77
VAE_FACTOR = 8
# Batch tensors per latent element (16 channels x patch 2 x 2 = 64 per image token): the cached
# posterior mean and log-variance, the sampled latents, the noise and the interpolant in fp32,
# and the interpolant cast to bf16; per context element one more bf16 copy than the block
# stores (the text dropout's output next to the loader's batch).
BATCH_BYTES_PER_LATENT_ELEMENT = 5 * 4 + 2
BATCH_BYTES_PER_CONTEXT_ELEMENT = 2
TABLE_PATH = Path(__file__).with_name("activation_memory.json")
# Recompute cost, cheapest first: the attention sublayer (qkv, kernel, output projection) is
# about 4 h^2 + 4 N h FLOPs per token, the MLP 8 h^2, the whole block all of it.
MODES_BY_COST = ("none", "attention", "mlp", "block")


@functools.cache
def activation_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: the activation table is missing; run "
            "`python bench/activation_memory.py` from a checkout to measure it"
        ) from None


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    source: str  # where the number comes from


@dataclass(frozen=True)
class ModeFit:
    """The largest micro batch that fits with one checkpointing mode."""

    mode: str
    max_micro_batch: int  # 0: not even one sample fits
    usable_micro_batch: int  # the largest <= max that divides global batch / world size
    total_bytes: int  # at the configured micro batch


@dataclass(frozen=True)
class MemoryPlan:
    config_name: str
    depth: int
    params: int
    world_size: int
    gpu: str
    micro_batch: int
    image_tokens: int
    text_tokens: int
    precision: str
    zero_stage: int
    offload: str
    checkpointing: str
    checkpointing_every: int
    components: tuple[Component, ...]
    total_bytes: int
    capacity_bytes: int
    fits: bool
    modes: tuple[ModeFit, ...]
    host_bytes_per_node: int  # DeepSpeed's estimate of CPU memory per node (not checked)
    advice: str  # one line when it does not fit
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def render(self) -> str:
        return render(self)


def plan(
    config: RunConfig,
    world_size: int | None = None,
    gpu_memory_gb: float | None = None,
    gpu: str | None = None,
    config_name: str = "",
) -> MemoryPlan:
    """Per-GPU memory of `config` on `world_size` GPUs (default launch.nodes x
    launch.gpus_per_node) of `gpu_memory_gb` each (default: the named `gpu`'s, else
    launch.gpu_memory_gb)."""
    launch, train = config.launch, config.train
    world = world_size or launch.nodes * launch.gpus_per_node
    if gpu is not None and gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)} (or give its memory)")
    memory_gb = gpu_memory_gb or (GPUS[gpu] if gpu else launch.gpu_memory_gb)
    if memory_gb <= 0:
        raise ValueError(f"GPU memory {memory_gb:g} GiB: must be > 0")
    capacity = int(memory_gb * GIB)
    mode, every = train.activation_checkpointing, train.activation_checkpointing_every
    components = step_components(config, world, train.micro_batch_size, mode, every)
    total = sum(c.bytes for c in components)
    modes = tuple(mode_fit(config, world, m, every, capacity) for m in MODES_BY_COST)
    fits = total <= capacity
    n_img, n_txt = tokens_per_sample(config)
    offload = "+".join(
        name
        for name, on in (("optimizer", train.offload_optimizer), ("params", train.offload_params))
        if on
    )
    return MemoryPlan(
        config_name=config_name,
        depth=config.model.depth,
        params=param_counts(config.model)["total"],
        world_size=world,
        gpu=gpu or ("--gpu-memory" if gpu_memory_gb else "launch.gpu_memory_gb"),
        micro_batch=train.micro_batch_size,
        image_tokens=n_img,
        text_tokens=n_txt,
        precision=train.precision,
        zero_stage=train.zero_stage,
        offload=offload or "none",
        checkpointing=mode,
        checkpointing_every=every,
        components=tuple(components),
        total_bytes=total,
        capacity_bytes=capacity,
        fits=fits,
        modes=modes,
        host_bytes_per_node=host_bytes_per_node(config, world),
        advice="" if fits else advice(config, world, capacity, total, modes),
        notes=tuple(shape_notes(config)),
    )


def step_components(
    config: RunConfig, world: int, micro_batch: int, mode: str, every: int
) -> list[Component]:
    """Everything one GPU holds at the peak of a training step, margin included."""
    parts = [
        *model_state_components(config, world, mode, every),
        *activation_components(config, micro_batch, mode, every),
    ]
    allocated = sum(c.bytes for c in parts)
    return [
        *parts,
        Component("CUDA context", CUDA_CONTEXT_BYTES, "driver, kernels and CUDA runtime"),
        Component("NCCL and cuBLAS workspaces", LIBRARY_WORKSPACE_BYTES, "communicator buffers"),
        Component(
            f"allocator margin ({ALLOCATOR_MARGIN:.0%})",
            int(ALLOCATOR_MARGIN * allocated),
            "caching-allocator fragmentation; sequence lengths vary by aspect bucket",
        ),
    ]


def mode_fit(config: RunConfig, world: int, mode: str, every: int, capacity: int) -> ModeFit:
    """Total bytes are exactly linear in the micro batch: fixed + per_sample x micro batch."""

    def total(micro_batch: int) -> int:
        return sum(c.bytes for c in step_components(config, world, micro_batch, mode, every))

    per_sample = total(2) - total(1)
    fixed = total(1) - per_sample
    largest = max(0, (capacity - fixed) // per_sample)
    while largest and total(largest) > capacity:  # integer rounding of the margin
        largest -= 1
    usable = largest
    if global_batch := config.train.global_batch_size:
        usable = next((m for m in range(largest, 0, -1) if global_batch % (m * world) == 0), 0)
    return ModeFit(mode, largest, usable, total(config.train.micro_batch_size))


# --------------------------------------------------------------------------------------------
# Model states
# --------------------------------------------------------------------------------------------


def model_state_components(
    config: RunConfig, world: int, mode: str = "none", every: int = 1
) -> list[Component]:
    train, model = config.train, config.model
    params = param_counts(model)["total"]
    block = largest_block_params(model)
    weight_bytes = 2 if train.precision == "bf16" else 4
    states, source = zero_model_states(config, world)
    parts = [Component(f"weights, gradients, Adam (ZeRO-{train.zero_stage})", states, source)]
    ema_where = "on the CPU with the offloaded optimizer" if train.offload_optimizer else ""
    parts.append(
        Component(
            "EMA of the weights (fp32, shard-local)",
            0 if train.offload_optimizer else math.ceil(4 * params / world),
            ema_where or f"4 B x {params / 1e6:.0f}M parameters / {world} GPUs",
        )
    )
    zero = zero_section(config)
    if train.zero_stage == 3:
        extra_blocks = blocks_in_flight(config, zero, mode, every)
        parts.append(
            Component(
                "gathered blocks in flight",
                extra_blocks * block * weight_bytes,
                f"the prefetched next block + {extra_blocks - 1} kept gathered for reuse "
                f"(stage3_max_reuse_distance {zero['stage3_max_reuse_distance']:.3g}); "
                f"{block / 1e6:.0f}M parameters x {weight_bytes} B each",
            )
        )
        buckets = zero["reduce_bucket_size"]
        why = "one gradient reduce bucket"
    else:
        # overlap_comm double-buffers the reduce bucket; the all-gather bucket is only used
        # after the optimizer step, when the activations are freed.
        buckets = 2 * zero["reduce_bucket_size"]
        why = "two gradient reduce buckets (overlap_comm)"
    parts.append(
        Component(
            "communication buckets",
            buckets * weight_bytes,
            f"{why}: {zero['reduce_bucket_size'] / 1e6:.0f}M elements x {weight_bytes} B",
        )
    )
    return parts


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


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def tokens_per_sample(config: RunConfig) -> tuple[int, int]:
    """(image tokens of the largest aspect bucket, text tokens).

    With several data.resolutions the heaviest micro batch decides: family r holds
    micro_batch_for(r) samples instead of train.micro_batch_size, so its largest bucket counts
    as that many / micro_batch_size samples' worth of tokens (rounded up)."""
    p = config.model.patch_size * VAE_FACTOR
    families = bucket_families(config.data)
    micro, base = config.train.micro_batch_size, families.resolutions[0]
    image = max(
        -(-micro_batch_for(r, micro, base) * max((h // p) * (w // p) for h, w in buckets) // micro)
        for r, buckets in families.families
    )
    return image, CLIP_TOKENS + config.conditioning.t5_max_length


def checkpoint_modes(depth: int, mode: str, every: int) -> list[str]:
    """What each block recomputes, as MMDiT.set_activation_checkpointing sets it."""
    return [mode if i % every == 0 else "none" for i in range(depth)]


def block_rate(model: MMDiTConfig, index: int, mode: str, what: str) -> tuple[float, float]:
    """(bytes per image token, bytes per text token) of block `index` from the table."""
    table = activation_table()["blocks"]["rms_norm" if model.qk_norm == "rms_norm" else "none"]
    last, dual = index == model.depth - 1, index in model.dual_attention_layers
    kind = "last" if last else ("dual" if dual else "joint")
    image, text = _rates(table[kind][mode][what], model.hidden_size)
    if last and dual:  # the last block with a second attention: add what dual adds
        d_img, _ = _rates(table["dual"][mode][what], model.hidden_size)
        j_img, _ = _rates(table["joint"][mode][what], model.hidden_size)
        image += d_img - j_img
    return image, text


def _rates(coefs: dict, hidden: int) -> tuple[float, float]:
    def per_token(c: dict) -> float:
        return c["per_hidden"] * hidden + c["constant"]

    if "image" in coefs:
        return per_token(coefs["image"]), per_token(coefs["text"])
    return per_token(coefs), per_token(coefs)


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one GPU's micro batch at the peak of the step."""

    stored_in_blocks: int
    stored_outside: int  # embedders, final layer, loss
    backward_working: int  # beyond the stored bytes, while the worst block runs backward
    batch_tensors: int

    @property
    def peak(self) -> int:
        return (
            self.stored_in_blocks + self.stored_outside + self.backward_working + self.batch_tensors
        )


def activation_bytes(
    config: RunConfig, micro_batch: int, mode: str, every: int, *, gpu_kernels: bool = True
) -> Activations:
    """From the measured table; `gpu_kernels=False` leaves out the GPU attention kernel's
    workspace (to compare with a CPU run)."""
    model = config.model
    n_img, n_txt = tokens_per_sample(config)
    scale = 2 if config.train.precision == "fp32" else 1
    # FlashAttention-2's backward accumulates dq in fp32 (B, N, H, Dh) plus a (B, H, N) fp32
    # softmax term, allocated inside the kernel where the table's measurement cannot see it.
    workspace = 4 * model.hidden_size + 4 * model.num_heads if gpu_kernels else 0
    stored, peak = [], []
    for i, block_mode in enumerate(checkpoint_modes(model.depth, mode, every)):
        s_img, s_txt = block_rate(model, i, block_mode, "stored")
        e_img, e_txt = block_rate(model, i, block_mode, "backward_extra")
        stored.append(scale * micro_batch * (n_img * s_img + n_txt * s_txt))
        extra = scale * (n_img * e_img + n_txt * e_txt) + (n_img + n_txt) * workspace
        peak.append(stored[-1] + micro_batch * extra)
    # The backward pass frees each block's activations after its backward: while block i runs
    # backward, the blocks below it still hold theirs.
    backward_peak = max(sum(stored[:i]) + peak[i] for i in range(model.depth))
    out_img, out_txt = _rates(activation_table()["outside"]["stored"], model.hidden_size)
    latent_elements = model.in_channels * model.patch_size**2
    return Activations(
        stored_in_blocks=int(sum(stored)),
        stored_outside=int(scale * micro_batch * (n_img * out_img + n_txt * out_txt)),
        backward_working=int(max(0, backward_peak - sum(stored))),
        batch_tensors=micro_batch
        * (
            n_img * latent_elements * BATCH_BYTES_PER_LATENT_ELEMENT
            + n_txt * model.context_dim * BATCH_BYTES_PER_CONTEXT_ELEMENT
        ),
    )


def activation_components(
    config: RunConfig, micro_batch: int, mode: str, every: int
) -> list[Component]:
    act = activation_bytes(config, micro_batch, mode, every)
    table = "training/activation_memory.json"
    if config.train.precision == "fp32":
        table += " x 2 for fp32"
    every_text = f"every {every} blocks" if every > 1 else "every block"
    return [
        Component(
            "activations stored by the blocks",
            act.stored_in_blocks,
            f"{config.model.depth} blocks, checkpointing {mode} ({every_text}); {table}",
        ),
        Component(
            "activations stored outside the blocks",
            act.stored_outside,
            f"embedders (context input), final layer, fp32 loss; {table}",
        ),
        Component(
            "backward working memory",
            act.backward_working,
            "one block at a time: recomputed activations, activation gradients, "
            "FlashAttention fp32 dq accumulator",
        ),
        Component(
            "batch tensors", act.batch_tensors, "latents, noise, interpolant (fp32); context (bf16)"
        ),
    ]


def shape_notes(config: RunConfig) -> list[str]:
    """Where the config leaves the shapes the activation table was measured at."""
    model, rule = config.model, activation_table()["shape_rule"]
    notes = []
    for name, measured in (
        ("head_dim", rule["head_dim"]),
        ("mlp_ratio", rule["mlp_ratio"]),
        ("patch_size", rule["patch_size"]),
        ("in_channels", rule["in_channels"]),
        ("context_dim", rule["context_dim"]),
    ):
        if getattr(model, name) != measured:
            notes.append(
                f"model.{name}={getattr(model, name)}: the activation table was measured at "
                f"{measured}; activations are extrapolated"
            )
    if model.attention_backend == "sdpa_math":
        notes.append(
            "attention_backend=sdpa_math stores the N x N attention matrix, which the table "
            "(flash-style kernels) does not count; use sdpa"
        )
    if config.train.compile:
        notes.append("train.compile: torch.compile may store less than the eager table says")
    if config.train.precision == "fp32":
        notes.append("precision fp32: activations are the bf16 table doubled (approximate)")
    return notes


# --------------------------------------------------------------------------------------------
# Advice and rendering
# --------------------------------------------------------------------------------------------


def advice(
    config: RunConfig, world: int, capacity: int, total: int, modes: tuple[ModeFit, ...]
) -> str:
    """One line: the smallest change that makes the run fit."""
    train = config.train
    need = f"needs {total / GIB:.1f} GiB per GPU, has {capacity / GIB:.1f}"
    by_mode = {m.mode: m for m in modes}
    current = by_mode[train.activation_checkpointing]
    options = []
    if current.usable_micro_batch:
        options.append(f"train.micro_batch_size={current.usable_micro_batch}")
    elif current.max_micro_batch:
        options.append(
            f"train.micro_batch_size={current.max_micro_batch} with a "
            "train.global_batch_size that is a multiple of it x the world size"
        )
    cheaper = next(
        (
            m
            for m in MODES_BY_COST
            if m != train.activation_checkpointing
            and by_mode[m].max_micro_batch >= train.micro_batch_size
        ),
        None,
    )
    if cheaper:
        options.append(
            f"train.activation_checkpointing={cheaper} (fits micro batch up to "
            f"{by_mode[cheaper].max_micro_batch})"
        )
    if options:
        return f"does not fit: {need}; set " + " or ".join(options)
    more = gpus_needed(config, capacity)
    fixes = []
    if train.zero_stage != 3:
        fixes.append("train.zero_stage=3")
    if not train.offload_optimizer:
        fixes.append("train.offload_optimizer=true")
    if more:
        fixes.append(f"launch.nodes={more // config.launch.gpus_per_node} ({more} GPUs)")
    return (
        f"does not fit: {need} and not even one sample fits: the model states are too large; "
        f"set {' or '.join(fixes) or 'a smaller model'}"
    )


def gpus_needed(config: RunConfig, capacity: int, max_nodes: int = 1024) -> int:
    """The fewest GPUs (whole nodes) on which one sample fits with block checkpointing, or 0."""
    per_node = config.launch.gpus_per_node

    def fits(nodes: int) -> bool:
        return mode_fit(config, nodes * per_node, "block", 1, capacity).max_micro_batch >= 1

    if not fits(max_nodes):
        return 0
    low, high = 0, max_nodes  # more GPUs never need more memory per GPU: bisect
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high * per_node


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def render(p: MemoryPlan) -> str:
    name = p.config_name or "run"
    lines = [
        f"memory plan for {name}: d{p.depth} MMDiT ({p.params / 1e9:.2f}B parameters), "
        f"{p.world_size} GPUs of {p.capacity_bytes / GIB:g} GiB ({p.gpu})",
        f"micro batch {p.micro_batch} x ({p.image_tokens} image + {p.text_tokens} text tokens)"
        f", {p.precision}, ZeRO-{p.zero_stage}, offload {p.offload}, checkpointing "
        f"{p.checkpointing}"
        + (f" every {p.checkpointing_every}" if p.checkpointing_every > 1 else ""),
        "",
    ]
    width = max(len(c.name) for c in p.components) + 2
    lines.append(f"{'per GPU':{width}}{'GiB':>8}   source")
    for c in p.components:
        lines.append(f"{c.name:{width}}{_gib(c.bytes):>8}   {c.source}")
    lines.append(f"{'total':{width}}{_gib(p.total_bytes):>8}")
    lines.append(f"{'capacity':{width}}{_gib(p.capacity_bytes):>8}   {p.gpu}")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"verdict: {verdict} ({p.total_bytes / p.capacity_bytes:.0%} of the GPU's memory)")
    lines.append("")
    every = f" every {p.checkpointing_every} blocks" if p.checkpointing_every > 1 else ""
    lines.append(f"largest micro batch per checkpointing mode{every}:")
    at_micro = f"GiB at micro {p.micro_batch}"
    lines.append(f"  {'mode':10}{'fits up to':>11}{'divides global':>16}{at_micro:>20}")
    for m in p.modes:
        mark = "  <- configured" if m.mode == p.checkpointing else ""
        lines.append(
            f"  {m.mode:10}{m.max_micro_batch:>11}{m.usable_micro_batch:>16}"
            f"{_gib(m.total_bytes):>20}{mark}"
        )
    lines.append(f"host memory per node (DeepSpeed's estimate): {_gib(p.host_bytes_per_node)} GiB")
    for note in p.notes:
        lines.append(f"note: {note}")
    if p.advice:
        lines.append(p.advice)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmdit-plan",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    card = parser.add_mutually_exclusive_group()
    card.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        help="plan for this card (" + ", ".join(f"{k} {v:g} GiB" for k, v in GPUS.items()) + ")",
    )
    card.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="plan for a card with this much memory (default: launch.gpu_memory_gb)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        parser.error(f"--gpu-memory {args.gpu_memory:g}: must be > 0 (GiB of one GPU)")
    config = config_from_args(RunConfig, args, parser)
    try:
        accumulation_steps(config.train, config.launch.nodes * config.launch.gpus_per_node)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {args.config}: {e}\n")
    result = plan(config, gpu_memory_gb=args.gpu_memory, gpu=args.gpu, config_name=args.config)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.render())
    return 0 if result.fits else 2


if __name__ == "__main__":
    sys.exit(main())
