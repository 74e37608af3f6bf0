"""The run file's schema: `RunConfig` = model + conditioning + data + train + eval + launch.

The section dataclasses live with the package that owns them (`mmdit.MMDiTConfig`,
`mmdit.conditioning.ConditioningConfig`, `data_pipeline.config.DataConfig`,
`data_pipeline.eval_config.EvalConfig`); `TrainConfig` and `LaunchConfig` live here because the
trainer honours both (the launch section describes the training job's process layout and
preemption policy; `slurm` turns it into a Slurm request). The DeepSpeed JSON is derived from
this tree, never written by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.buckets import buckets_for
from data_pipeline.config import DataConfig
from data_pipeline.eval_config import EvalConfig
from mmdit.conditioning.config import ConditioningConfig
from mmdit.conditioning.vae import SPATIAL_FACTOR as LATENT_FACTOR
from mmdit.lora import scale as lora_scale
from mmdit.model import MMDiTConfig


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/debug"
    seed: int = 0
    max_steps: int = 1000
    # Weights-only start (training.init_from): "" = random init; else a run RUN (its newest
    # checkpoint) or RUN:STEP, a checkpoint directory, a diffusers SD3Transformer2DModel
    # folder, an SD3/SD3.5 single file or an mmdit-export .safetensors file. The run starts at
    # step 0 with fresh optimizer and data state; once the run has a checkpoint of its own it
    # resumes from that and this key is ignored. init_weights picks a run's EMA or trained
    # ("raw") weights; exported files hold one set of weights.
    init_from: str = ""
    init_weights: Literal["ema", "raw"] = "ema"
    # Global batch = micro_batch_size x gradient accumulation x world size; 0 means no
    # accumulation. Kept fixed when a run resumes on a different world size. With several
    # data.resolutions both count samples of the smallest one: a step is still accumulation
    # x world micro batches, and a micro batch of resolution r holds micro_batch_size x
    # (min / r)**2 samples, so every step carries about the same number of image tokens.
    micro_batch_size: int = 4
    global_batch_size: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"
    # Throughput and memory levers (README "Throughput levers"); none changes the model's
    # function, each is tested equal to the default path. Activation checkpointing recomputes
    # the whole block, or only its attention or MLP sublayers, in every k-th block.
    activation_checkpointing: Literal["none", "block", "attention", "mlp"] = "none"
    activation_checkpointing_every: int = 1
    compile: bool = False  # torch.compile each joint block (regional compilation)
    zero_stage: Literal[1, 2, 3] = 3
    offload_optimizer: bool = False  # fp32 master weights and Adam states in CPU memory
    offload_params: bool = False  # ZeRO-3 only: the bf16 weights wait in CPU memory too
    # AdamW; no weight decay on norms, biases, embeddings and position tables.
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0
    # Rectified-flow objective (SD3: logit-normal m=0, s=1, unweighted).
    sigma_density: Literal["logit_normal", "uniform", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: Literal["none", "cosmap"] = "none"
    # Train-time timestep shift (SD3 sec. 5.3.2): every drawn sigma goes through
    # alpha s / (1 + (alpha - 1) s), which moves training towards the noise end. alpha = shift
    # (1 = none); with shift_base_resolution > 0 it is SD3's per-bucket rule
    # alpha = shift * sqrt(h * w) / shift_base_resolution (h x w = the micro batch's bucket in
    # pixels). Sampling (eval.shift: 0), previews and the sigma bins of the loss log follow it.
    shift: float = 1.0
    shift_base_resolution: int = 0
    # Per-encoder text dropout for classifier-free guidance (all three together ~10%).
    text_dropout: float = 0.463
    ema_decay: float = 0.9999
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    max_consecutive_skips: int = 10  # non-finite loss/grad steps in a row before aborting
    # Peak dense bf16 FLOP/s per device for MFU; 0 = look the device up (mmdit.flops).
    peak_flops: float = 0.0
    # Preview grid (rank 0, EMA weights, fixed prompts and seed) every N steps; 0 = never.
    # Sampling steps, CFG scale and shift come from the eval section.
    preview_every: int = 0
    preview_prompts: tuple[str, ...] = (
        "a photograph of a cat",
        "a handwritten digit seven",
        "a red car on a mountain road",
        "a bowl of fruit on a wooden table",
    )
    preview_seed: int = 0
    # Weights & Biases logging when a project is set (pip install wandb on the cluster);
    # the JSONL metrics file and TensorBoard are always written.
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_mode: Literal["online", "offline"] = "online"

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.global_batch_size and self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        if self.keep_checkpoints < 2:
            raise ValueError(
                f"keep_checkpoints={self.keep_checkpoints} must be >= 2 so a damaged newest "
                "checkpoint always has a predecessor"
            )
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"text_dropout={self.text_dropout} must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.activation_checkpointing_every < 1:
            raise ValueError(
                f"activation_checkpointing_every={self.activation_checkpointing_every} must be "
                ">= 1 (1 = every block)"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params needs zero_stage=3 (got {self.zero_stage}): only ZeRO-3 "
                "partitions the weights; use offload_optimizer with stage 1 or 2"
            )
        if not self.shift > 0:
            raise ValueError(f"train.shift={self.shift} must be > 0 (1 = no shift)")
        if self.shift_base_resolution < 0:
            raise ValueError(
                f"train.shift_base_resolution={self.shift_base_resolution} must be >= 0 "
                "(0 = the fixed train.shift; e.g. 256 for SD3's sqrt(h*w)/256 rule)"
            )
        if self.lr <= 0 or self.max_steps < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0; max_steps and warmup_steps must be >= 0")


@dataclass(frozen=True)
class LaunchConfig:
    nodes: int = 1
    # One training task (rank) per GPU; with gpus=false the same number of CPU-only tasks
    # per node is started and no GPUs are requested (CPU clusters, the local test cluster).
    gpus_per_node: int = 1
    gpus: bool = True
    # Memory of one GPU, for the memory plan (mmdit-plan, mmdit-submit): H100 80, H200 141.
    gpu_memory_gb: float = 80.0
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "72:00:00"
    constraint: str = ""
    mem: str = ""
    cpus_per_task: int = 8
    exclusive: bool = False
    # Slurm sends USR2 this many seconds before the time limit; the job checkpoints on all
    # ranks at the next step boundary and requeues itself, at most max_requeues times.
    signal_lead_s: int = 180
    max_requeues: int = 20
    # After a hang or a lost rank (training.watchdog) the job requeues itself (counted in
    # max_requeues); with this, the hosts of the stuck ranks are excluded from the next
    # allocation (scontrol update ExcNodeList).
    exclude_bad_nodes: bool = False

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1 or self.cpus_per_task < 1:
            raise ValueError("nodes, gpus_per_node and cpus_per_task must be >= 1")
        if self.gpu_memory_gb <= 0:
            raise ValueError(f"gpu_memory_gb={self.gpu_memory_gb} must be > 0")
        if self.signal_lead_s < 0 or self.max_requeues < 0:
            raise ValueError("signal_lead_s and max_requeues must be >= 0")


@dataclass(frozen=True)
class FaultConfig:
    """How long each part of training may take on a rank before the job is declared hung
    (training.watchdog; 0 = no limit), and what a failed checkpoint write does."""

    # Building the model, loading a checkpoint, starting the data workers and the first step
    # (which compiles and gathers the first batches).
    setup_timeout_s: float = 1800.0
    # One optimizer step (micro batches, update, EMA, log-step collectives). With
    # step_timeout_factor > 0 the limit is max(step_timeout_s, factor x the slowest of the
    # recent steps): a floor that adapts to the run's own speed.
    step_timeout_s: float = 600.0
    step_timeout_factor: float = 0.0
    checkpoint_timeout_s: float = 1800.0
    eval_timeout_s: float = 1800.0  # validation and preview grids
    heartbeat_s: float = 10.0  # how often each rank writes RUN/heartbeats/rank_N.json
    # The process group's own timeout, a last resort behind the limits above (which report
    # the stuck rank); NCCL's async error handling is on, so a timed-out collective aborts.
    collective_timeout_s: float = 3600.0
    # Straggler report (training.stragglers): warn when one rank's block compute or data wait
    # is more than straggler_factor x the median for straggler_windows log windows in a row.
    straggler_factor: float = 1.3  # 0 = no warnings (the metrics are still logged)
    straggler_windows: int = 3
    # A checkpoint that cannot be written (disk full, quota, I/O error on any rank) is never
    # published and leaves `latest` and the older checkpoints as they were. `continue`: train
    # on and try again at the next checkpoint step (if the final one at max_steps fails, the
    # run ends with status 5 instead of 0); `stop`: end at once with status 5 (EXIT_STORAGE:
    # fix the storage, then rerun to resume from the last checkpoint).
    on_checkpoint_error: Literal["continue", "stop"] = "continue"

    def __post_init__(self):
        limits = (
            self.setup_timeout_s,
            self.step_timeout_s,
            self.step_timeout_factor,
            self.checkpoint_timeout_s,
            self.eval_timeout_s,
        )
        if min(limits) < 0:
            raise ValueError("fault timeouts and step_timeout_factor must be >= 0 (0 = no limit)")
        if self.heartbeat_s <= 0 or self.collective_timeout_s <= 0:
            raise ValueError("heartbeat_s and collective_timeout_s must be > 0")
        if self.straggler_factor != 0 and self.straggler_factor <= 1:
            raise ValueError(
                f"faults.straggler_factor={self.straggler_factor}: must be > 1 (how many times "
                "the median a slow rank takes) or 0 to switch the warning off"
            )
        if self.straggler_windows < 1:
            raise ValueError("faults.straggler_windows must be >= 1")


# The Linear layers a LoRA may adapt, by their names in mmdit.model: inside every joint block
# (both streams where the stream has the layer; attn2 only in dual-attention blocks) and at the
# top level. All have a diffusers counterpart, so every choice exports (mmdit.convert).
LORA_BLOCK_TARGETS = (
    "attn.qkv",
    "attn.proj",
    "attn2.qkv",
    "attn2.proj",
    "mlp.fc1",
    "mlp.fc2",
    "modulation",
)
LORA_TOP_TARGETS = ("context_embedder", "final_layer.linear", "final_layer.modulation")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (training.lora, with peft): rank 0 trains every weight; rank r > 0
    freezes the model and trains W + (alpha / r) * B @ A on the `targets` Linears only."""

    rank: int = 0
    alpha: float = 0.0  # 0 = the rank (scale 1)
    dropout: float = 0.0  # on the LoRA branch's input (peft's lora_dropout)
    # Names from LORA_BLOCK_TARGETS and LORA_TOP_TARGETS. The default is the attention
    # projections (q, k, v and out of both streams), as diffusers' SD3 LoRA script does.
    targets: tuple[str, ...] = ("attn.qkv", "attn.proj")
    # peft's init: "default" = A Kaiming-uniform, B zero (the model starts unchanged);
    # "gaussian" = A normal(0, 1/rank), B zero.
    init: Literal["default", "gaussian"] = "default"

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha) if self.rank else 0.0

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank}: must be >= 0 (0 = no LoRA)")
        if self.alpha < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"lora.alpha={self.alpha} must be >= 0 and lora.dropout={self.dropout} in [0, 1)"
            )
        known = LORA_BLOCK_TARGETS + LORA_TOP_TARGETS
        unknown = [t for t in self.targets if t not in known]
        if unknown or (self.rank and not self.targets):
            raise ValueError(
                f"lora.targets={list(self.targets)}: expected a non-empty list of "
                f"{', '.join(known)}"
            )


@dataclass(frozen=True)
class RunConfig:
    model: MMDiTConfig = field(default_factory=lambda: MMDiTConfig.preset("d2"))
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        # The largest bucket must fit the model's position table, or the run would fail at
        # its first batch of that bucket, possibly hours in.
        m, d = self.model, self.data
        side = max(max(b) for b in buckets_for(d)) // (LATENT_FACTOR * m.patch_size)
        if side > m.pos_embed_max_size:
            raise ValueError(
                f"model.pos_embed_max_size={m.pos_embed_max_size} is smaller than the "
                f"{side} patches of the longest bucket side at data resolution "
                f"{max(d.all_resolutions)}; set model.pos_embed_max_size >= {side} or lower "
                "data.resolution(s) / data.max_aspect_ratio"
            )
