"""`mmdit-plan`: the GPU memory a training run needs per GPU, checked before it is submitted.

    mmdit-plan --config configs/d24_512px.yaml                      # the table and the verdict
    mmdit-plan --config configs/d24_256px.yaml --gpu h200           # another card
    mmdit-plan --config configs/d24_512px.yaml launch.nodes=2 train.micro_batch_size=16
    mmdit-plan --config configs/d24_512px.yaml --json               # for machines
    mmdit-plan --config configs/sd3_recipe.yaml                     # every stage of a chain

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

# One module for the plan, its advice and its table (they read the same Components and
# ModeFits); the numbers come from training/zero_memory.py and training/activation_memory.py.

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from mmdit.flops import largest_block_params, param_counts
from mmdit.typed_config import ConfigError, add_config_arguments, config_from_args
from training.activation_memory import activation_bytes, shape_notes, tokens_per_sample
from training.config import RunConfig
from training.ds_config import accumulation_steps, zero_section
from training.zero_memory import blocks_in_flight, host_bytes_per_node, zero_model_states

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
# Recompute cost, cheapest first: the attention sublayer (qkv, kernel, output projection) is
# about 4 h^2 + 4 N h FLOPs per token, the MLP 8 h^2, the whole block all of it.
MODES_BY_COST = ("none", "attention", "mlp", "block")


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


# --------------------------------------------------------------------------------------------
# Activations (computed in training/activation_memory.py)
# --------------------------------------------------------------------------------------------


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
    from training.stages import has_stages, load_stages

    try:  # a chain of stages (training.stages) is planned stage by stage
        stages = load_stages(args.config, args.overrides) if has_stages(args.config) else None
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if stages:
        runs = [(f"{args.config} stage {s.name}", s.config) for s in stages]
    else:
        runs = [(args.config, config_from_args(RunConfig, args, parser))]
    results = {}
    for name, config in runs:
        try:
            accumulation_steps(config.train, config.launch.nodes * config.launch.gpus_per_node)
        except ValueError as e:
            parser.exit(2, f"{parser.prog}: error: {name}: {e}\n")
        results[name] = plan(config, gpu_memory_gb=args.gpu_memory, gpu=args.gpu, config_name=name)
    if args.json:
        dicts = {n: r.to_dict() for n, r in results.items()}
        print(json.dumps(dicts if stages else dicts[args.config], indent=1))
    else:
        print("\n\n".join(r.render() for r in results.values()))
    return 0 if all(r.fits for r in results.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
