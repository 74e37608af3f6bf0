"""`train.init_from`: start a run from existing weights, and nothing else of another run.

Only the weights are taken: the optimizer, the data position, the step and the RNG states start
fresh (step 0). Sources are whatever `mmdit.weights.load_weights` reads: a run `RUN` (its
newest published checkpoint) or `RUN:STEP`, a checkpoint directory, a diffusers
`SD3Transformer2DModel` folder, an SD3/SD3.5 single file, an `mmdit-export` file. For runs and
checkpoints `train.init_weights` picks the EMA (default) or the trained ("raw") weights.

Rank 0 alone reads the source, whole, into its CPU memory (one fp32 copy: 4 bytes per
parameter, 8.1 GB for d24 and 32 GB for d38, released once loaded; a raw ZeRO checkpoint goes
through DeepSpeed's consolidation first); the other ranks read nothing and no GPU holds more
than its own shard.
The weights reach the model in two places, both needed for an exact start under mixed
precision:
1. before `deepspeed.initialize`, the module's (possibly bf16) parameters, one top-level part
   at a time: under ZeRO-3 inside `GatheredParameters(modifier_rank=0)`, so DeepSpeed scatters
   rank 0's values; under ZeRO-1/2 on rank 0, and DeepSpeed's initialize broadcasts them;
2. after it, DeepSpeed's fp32 master weights, one tensor at a time broadcast from rank 0, each
   rank keeping its own piece: a bf16 run starts from the source's exact fp32 values (the
   master weights would otherwise be the bf16-rounded copy), and so does the EMA, which is
   built from the master weights afterwards.

The position table is a fixed function of this run's sample_size and pos_embed_max_size and is
rebuilt, never copied, so a 256 px run's weights start a 1024 px run. Every other difference
(architecture keys, tensor names or shapes) fails before training, on every rank, with one
line naming the keys and tensors and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit import distributed
from mmdit.checkpoints import CheckpointError, is_training_checkpoint
from mmdit.convert import check_state_dict
from mmdit.model import MMDiT, MMDiTConfig
from mmdit.weights import Weights, load_weights

log = logging.getLogger(__name__)

# Keys that may differ between the source and the run: they only shape the position table,
# which is rebuilt; the attention backend is an execution setting.
FREE_KEYS = ("sample_size", "pos_embed_max_size", "attention_backend")
POSITION_TABLE = "pos_embed"


class InitFromError(ValueError):
    """train.init_from names weights this run cannot start from (one line, with the fix)."""


@dataclass
class InitSource:
    """The weights a run starts from, as read by rank 0 (state_dict is None elsewhere)."""

    spec: str
    record: dict  # what the run records (metrics.jsonl): source, kind, weights, step, hash
    state_dict: dict[str, torch.Tensor] | None


def config_differences(source: MMDiTConfig, run: MMDiTConfig) -> list[str]:
    """`model.KEY=SOURCE (this run RUN)` for every architecture key that differs."""
    out = []
    for f in dataclasses.fields(MMDiTConfig):
        if f.name in FREE_KEYS:
            continue
        theirs, ours = getattr(source, f.name), getattr(run, f.name)
        if theirs != ours:
            out.append(f"model.{f.name}={_yaml(theirs)} (this run {_yaml(ours)})")
    return out


def _yaml(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def content_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of the loaded tensors (names, shapes, fp32 values): what a run started
    from, comparable across runs."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(state_dict):
        t = state_dict[name].detach().float().contiguous().cpu()
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def check_fits(weights: Weights, run: MMDiTConfig, spec: str) -> dict[str, torch.Tensor]:
    """The source's tensors minus the position table, or InitFromError naming what differs."""
    sd = {k: v for k, v in weights.state_dict.items() if k != POSITION_TABLE}
    with torch.device("meta"):
        expected = {
            k: v.shape
            for k, v in MMDiT(run.portable(), initialize=False).state_dict().items()
            if k != POSITION_TABLE
        }
    differences = config_differences(weights.config, run)
    tensors = ""
    try:
        check_state_dict(sd, expected, "start for this run's model")
    except ValueError as e:
        tensors = str(e).split(": ", 1)[1]
    if not differences and not tensors:
        return sd
    what = f"train.init_from={spec} ({weights.kind} {weights.source})"
    if differences:
        keys = ", ".join(differences)
        fix = (
            "set those model.* keys to the source's values in the run file (only "
            "model.sample_size and model.pos_embed_max_size may differ: the position table is "
            "rebuilt), or start from weights of this architecture"
        )
        raise InitFromError(
            f"{what} has another architecture: {keys}"
            + (f"; tensors that do not fit: {tensors}" if tensors else "")
            + f"; {fix}"
        )
    raise InitFromError(
        f"{what}: tensors do not fit this run's model: {tensors}; the source is not an MMDiT "
        "of this run's model section: export it again or fix the model.* keys"
    )


def read_source(spec: str, weights: str, run: MMDiTConfig, rank: int) -> InitSource:
    """Collective: rank 0 reads and checks `spec`; every rank gets the same record, or the
    same InitFromError (so no rank is left waiting in a collective)."""
    state_dict, record, error = None, None, None
    if rank == 0:
        try:
            state_dict, record = _read(spec, weights, run)
        except (InitFromError, CheckpointError, FileNotFoundError, ValueError) as e:
            error = " ".join(str(e).split())
            if not error.startswith("train.init_from"):
                error = f"train.init_from={spec}: {error}"
    record, error = distributed.broadcast_object((record, error))
    if error is not None:
        raise InitFromError(error)
    return InitSource(spec, record, state_dict)


def _read(spec: str, weights: str, run: MMDiTConfig) -> tuple[dict, dict]:
    if not spec.strip():
        raise InitFromError("train.init_from is empty")
    loaded = load_weights(spec, ema=False) if weights == "raw" else _load_ema_if_any(spec)
    sd = check_fits(loaded, run, spec)
    record = {
        "init_from": spec,
        "source": str(Path(loaded.source).resolve()),
        "kind": loaded.kind,
        "weights": loaded.weights,
        "source_step": loaded.step if loaded.step is not None else -1,
        "hash": content_hash(sd),
        "tensors": len(sd),
    }
    return sd, record


def _load_ema_if_any(spec: str) -> Weights:
    """The EMA of a run or checkpoint; exported weights (one set) as they are."""
    return load_weights(spec, ema=is_training_checkpoint(spec))


def copy_into_module(model: MMDiT, source: InitSource, rank: int, zero3: bool) -> None:
    """Step 1 (before deepspeed.initialize): the module's parameters, one weight-init part at
    a time. Collective under ZeRO-3. The position table is rebuilt by the caller."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = source.state_dict
    for part in model.weight_init_parts():
        params = list(part.parameters())
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if rank == 0:
                    _copy(params, names, sd)
        elif rank == 0:  # deepspeed.initialize broadcasts rank 0's module to the others
            _copy(params, names, sd)


@torch.no_grad()
def _copy(params, names, sd) -> None:
    for p in params:
        p.data.copy_(sd[names[id(p)]])


@torch.no_grad()
def copy_into_master_weights(
    engine, source: InitSource, rank: int, world: int, device: torch.device
) -> None:
    """Step 2 (after deepspeed.initialize, before the EMA is built): every rank's piece of
    DeepSpeed's fp32 master weights, one tensor at a time broadcast from rank 0."""
    from training.ema import local_piece

    sd = source.state_dict
    for name, param in engine.module.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        full = (
            sd[name].to(device=device, dtype=torch.float32).contiguous()
            if rank == 0
            else torch.empty(shape, dtype=torch.float32, device=device)
        )
        if world > 1:
            torch.distributed.broadcast(full, src=0)
        piece = local_piece(param, rank, world)
        flat = full.reshape(-1)
        n = piece.weights.numel()
        have = max(0, min(n, flat.numel() - piece.start))
        # ZeRO-3's last piece may run past the tensor into padding, which stays as it was.
        piece.weights[:have].copy_(flat[piece.start : piece.start + have].to(piece.weights.device))
    source.state_dict = None  # rank 0's copy is no longer needed
