"""EMA of the weights under ZeRO: each rank averages only its own piece of the fp32 master weights.

DeepSpeed keeps the fp32 master weights partitioned over the ranks, in a different layout per
stage: ZeRO-3 flattens every parameter, pads it to a multiple of the world size and gives rank
r the slice [r*n, (r+1)*n); ZeRO-1/2 flatten all parameters of a group into one buffer and give
each rank a contiguous range of it, so a rank holds a fragment of some parameters (at any
offset) and nothing of others. Either way a rank's piece of a parameter is one contiguous run
of its flattened elements, a `Piece` (offset, view of the fp32 master elements). The EMA keeps
a shadow of exactly those elements: 4 bytes per parameter divided by the world size, and no
communication per step.

The views into DeepSpeed's flat buffers are located once (and again after a checkpoint load):
looking one up costs ZeRO-3 a stream synchronisation per parameter on a GPU, and the per-step
update is then one `torch._foreach_lerp_` over cached tensors, with no host sync.

Saved as one safetensors file per rank with each piece's offset in the metadata;
`mmdit.checkpoints.ema_state_dict` reassembles full tensors from the pieces of any world size and
stage, and `load` re-slices them for the current layout, so a run resumes its EMA on another
number of ranks or another ZeRO stage and `mmdit-export --ema` needs no GPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# File names and the reader of the saved pieces are shared with eval and mmdit-export.
from mmdit.atomic_file import atomic_path
from mmdit.checkpoints import ema_shard_name, ema_state_dict


@dataclass
class Piece:
    """A rank's elements of one parameter: flattened full tensor [start, start + numel)."""

    start: int
    weights: torch.Tensor  # 1-D view of the fp32 master weights (ZeRO-3: may run into padding)


def local_partition(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 slice of a full tensor (flattened, zero-padded to world x n)."""
    flat = full.reshape(-1)
    n = -(-flat.numel() // world)  # ceil
    padded = torch.zeros(n * world, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded[rank * n : (rank + 1) * n].clone()


def local_piece(param: torch.nn.Parameter, rank: int, world: int) -> Piece:
    """Where this rank's fp32 master elements of `param` live, for any ZeRO stage."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        # The view itself: the public safe_get_local_fp32_param copies it to the accelerator
        # when the optimizer is offloaded, which would freeze the EMA's input.
        view, _ = param._z3_optimizer._get_fp32_opt_state_partition(
            param, release_swap_buffers=False
        )
        return Piece(rank * view.numel(), view)
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: a fragment of this rank's flat partition
        mapping = param._hp_mapping
        if mapping is None:  # no element of this parameter is on this rank
            return Piece(0, torch.empty(0, dtype=torch.float32, device=param.device))
        return Piece(mapping.lp_fragment_address.start, mapping.hp_fragment)
    if world != 1:
        raise ValueError(
            "the EMA needs DeepSpeed ZeRO (stage 1, 2 or 3) to know which elements of a "
            f"parameter rank {rank} of {world} owns"
        )
    return Piece(0, param.detach().reshape(-1))  # one process, no ZeRO: the whole parameter


class ShardedEMA:
    """shadow <- decay * shadow + (1 - decay) * weights, over this rank's pieces."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        decay: float,
        rank: int = 0,
        world: int = 1,
    ):
        self.decay = decay
        # A LoRA run's frozen base weights (rank 0) and scale, which gather_model merges with
        # the adapters' EMA (set by training.lora.attach_frozen_base).
        self.frozen_base: dict[str, torch.Tensor] | None = None
        self.lora_scale = 0.0
        self.rank, self.world = rank, world
        self.params = dict(named_params)
        # Shapes of the full tensors, from ZeRO's metadata where the param is partitioned.
        self.shapes = {
            name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.params.items()
        }
        self.bind()
        self.shadow = {
            name: piece.weights.detach().float().clone() for name, piece in self.pieces.items()
        }

    def bind(self) -> None:
        """Locate (again) the master weights each shadow follows; call after the optimizer's
        buffers may have been replaced (a checkpoint load)."""
        self.pieces = {
            name: local_piece(p, self.rank, self.world) for name, p in self.params.items()
        }

    @property
    def starts(self) -> dict[str, int]:
        return {name: piece.start for name, piece in self.pieces.items()}

    @torch.no_grad()
    def update(self) -> None:
        """After an applied optimizer step: shadow <- decay * shadow + (1 - decay) * weights."""
        names = [n for n, t in self.shadow.items() if t.numel()]
        weights = [self.pieces[n].weights for n in names]
        if weights and weights[0].dtype != torch.float32:
            weights = [w.float() for w in weights]  # no ZeRO, bf16 weights (not a trainer path)
        torch._foreach_lerp_([self.shadow[n] for n in names], weights, 1.0 - self.decay)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / ema_shard_name(self.rank, self.world)
        meta = {
            "shapes": json.dumps(self.shapes),
            "starts": json.dumps(self.starts),
            "decay": repr(self.decay),
        }
        with atomic_path(path) as tmp:
            save_file({n: t.contiguous().cpu() for n, t in self.shadow.items()}, str(tmp), meta)
        return path

    def load(self, directory: str | Path) -> None:
        full = ema_state_dict(directory)
        missing = set(self.shadow) - set(full)
        if missing:
            raise ValueError(f"EMA in {directory} lacks {sorted(missing)[:5]}")
        for name, value in full.items():
            if name not in self.shadow:
                raise ValueError(f"EMA in {directory} has {name!r}, which this model lacks")
            if tuple(value.shape) != self.shapes[name]:
                raise ValueError(
                    f"EMA {name} has shape {tuple(value.shape)} in {directory}, "
                    f"the model has {self.shapes[name]}"
                )
            shadow = self.shadow[name]
            part = _elements(value.float().reshape(-1), self.starts[name], shadow.numel())
            shadow.copy_(part.to(shadow.device))


def _elements(flat: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """flat[start : start + numel], zero-padded past the end (ZeRO-3's padding)."""
    out = torch.zeros(numel, dtype=flat.dtype)
    have = max(0, min(numel, flat.numel() - start))
    out[:have] = flat[start : start + have]
    return out


def gather_full(ema: ShardedEMA) -> dict[str, torch.Tensor] | None:
    """Collective: the whole EMA as full fp32 CPU tensors on rank 0 (None elsewhere), one
    parameter at a time: every rank writes its piece into a zero tensor and a sum-reduce to
    rank 0 assembles it (pieces never overlap), whatever the ZeRO stage's layout."""
    import torch.distributed as dist

    distributed = ema.world > 1 and dist.is_initialized()
    out: dict[str, torch.Tensor] = {}
    for name, shadow in ema.shadow.items():
        shape = ema.shapes[name]
        numel = int(torch.Size(shape).numel())
        full = torch.zeros(numel, dtype=torch.float32, device=shadow.device)
        start = ema.starts[name]
        have = max(0, min(shadow.numel(), numel - start))
        full[start : start + have] = shadow[:have]
        if distributed:
            dist.reduce(full, dst=0, op=dist.ReduceOp.SUM)
        if ema.rank == 0:
            out[name] = full.reshape(shape).cpu()
    return out if ema.rank == 0 else None


def gather_model(ema: ShardedEMA, config, device: torch.device):
    """Collective: a plain eval-mode MMDiT(config) holding the EMA on rank 0 (None elsewhere),
    for previews and validation; buffers the EMA does not keep come from the fresh build."""
    from mmdit.model import MMDiT

    weights = gather_full(ema)
    if weights is None:
        return None
    if ema.frozen_base is not None:  # a LoRA run: the EMA holds the adapters (training.lora)
        from mmdit import lora

        base, adapters = lora.split({**ema.frozen_base, **weights})
        weights = lora.merge({k: v.float() for k, v in base.items()}, adapters, ema.lora_scale)
    model = MMDiT(config.portable(), initialize=False)  # rank 0 alone: no kernel constraints
    state = model.state_dict()
    state.update(weights)
    model.load_state_dict(state)
    return model.to(device).eval()
