"""The activation memory of a training step, from the measured table
training/activation_memory.json (made by bench/activation_memory.py): bytes saved for backward
per token, per joint block and checkpointing mode, linear in the width; what the embedders,
final layer and loss store; the backward's working memory; the batch tensors. mmdit-plan
(training/memory_plan.py) adds these to the model states."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.buckets import bucket_families, micro_batch_for
from mmdit.model import MMDiTConfig
from training.config import RunConfig

CLIP_TOKENS = 77
VAE_FACTOR = 8
# Batch tensors per latent element (16 channels x patch 2 x 2 = 64 per image token): the cached
# posterior mean and log-variance, the sampled latents, the noise and the interpolant in fp32,
# and the interpolant cast to bf16; per context element one more bf16 copy than the block
# stores (the text dropout's output next to the loader's batch).
BATCH_BYTES_PER_LATENT_ELEMENT = 5 * 4 + 2
BATCH_BYTES_PER_CONTEXT_ELEMENT = 2
TABLE_PATH = Path(__file__).with_name("activation_memory.json")


@functools.cache
def activation_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: the activation table is missing; run "
            "`python bench/activation_memory.py` from a checkout to measure it"
        ) from None


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
