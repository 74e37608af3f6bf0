"""EMA of the weights under ZeRO-3: each rank averages only its own fp32 partitions.

ZeRO-3 flattens every parameter, pads it to a multiple of the world size and gives rank r the
slice [r*n, (r+1)*n). The EMA keeps the same slices of the fp32 master weights, so it costs
4 bytes per parameter divided by the world size and no communication per step. Saved as one
safetensors file per rank; `eval.checkpoints.ema_state_dict` concatenates the slices (any world
size), and `load` re-slices a full state for the current world size, so a run resumes its EMA on a
different number of ranks and `mmdit-export --ema` needs no GPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

# File names and the reader of the saved slices are shared with eval and mmdit-export.
from eval.checkpoints import ema_shard_name, ema_state_dict


def local_partition(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 slice of a full tensor (flattened, zero-padded to world x n)."""
    flat = full.reshape(-1)
    n = -(-flat.numel() // world)  # ceil
    padded = torch.zeros(n * world, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded[rank * n : (rank + 1) * n].clone()


def _fp32_partition(param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param).reshape(-1)
    return param.detach().reshape(-1)  # no ZeRO (tests, single-process references)


class ShardedEMA:
    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        decay: float,
        rank: int = 0,
        world: int = 1,
    ):
        self.decay = decay
        self.rank, self.world = rank, world
        self.params = dict(named_params)
        # Shapes of the full tensors, from ZeRO's metadata where the param is partitioned.
        self.shapes = {
            name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.params.items()
        }
        self.shadow = {
            name: _fp32_partition(p).detach().float().clone() for name, p in self.params.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        """After an applied optimizer step: shadow <- decay * shadow + (1 - decay) * weights."""
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        weights = [_fp32_partition(self.params[n]).float() for n in names]
        torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / ema_shard_name(self.rank, self.world)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"shapes": json.dumps(self.shapes), "decay": repr(self.decay)}
        save_file({n: t.contiguous().cpu() for n, t in self.shadow.items()}, str(tmp), meta)
        tmp.replace(path)
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
            part = local_partition(value.float(), self.rank, self.world)
            self.shadow[name].copy_(part.to(self.shadow[name].device))


def gather_full(ema: ShardedEMA) -> dict[str, torch.Tensor] | None:
    """Collective: the whole EMA as full fp32 CPU tensors on rank 0 (None elsewhere), one
    parameter at a time so no rank holds more than one full tensor beyond rank 0's copy."""
    import torch.distributed as dist

    if ema.world == 1 or not dist.is_initialized():
        return {
            name: shard[: _numel(ema.shapes[name])].reshape(ema.shapes[name]).cpu().clone()
            for name, shard in ema.shadow.items()
        }
    out: dict[str, torch.Tensor] = {}
    for name, shard in ema.shadow.items():
        parts = [torch.empty_like(shard) for _ in range(ema.world)]
        dist.all_gather(parts, shard.contiguous())
        if ema.rank == 0:
            shape = ema.shapes[name]
            out[name] = torch.cat(parts)[: _numel(shape)].reshape(shape).cpu()
    return out if ema.rank == 0 else None


def gather_model(ema: ShardedEMA, config, device: torch.device):
    """Collective: a plain eval-mode MMDiT(config) holding the EMA on rank 0 (None elsewhere),
    for previews and validation; buffers the EMA does not keep come from the fresh build."""
    from mmdit.model import MMDiT

    weights = gather_full(ema)
    if weights is None:
        return None
    model = MMDiT(config, initialize=False)
    state = model.state_dict()
    state.update(weights)
    model.load_state_dict(state)
    return model.to(device).eval()


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())
