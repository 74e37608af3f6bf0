"""Process layout from whichever launcher started us, and the few collectives we need.

Launchers announce ranks differently: `torchrun` and `deepspeed` set RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
and the allocation's node list (the first node hosts the rendezvous); a plain `python` is one
process. `detect` reads them in that order; `init_process_group` exports the torch variables
and starts a plain torch process group (evaluation); the trainer starts its group through
DeepSpeed (training.launch). Torch only: shared by the trainer and eval.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (also deepspeed), "srun" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`gpu[003-005,007],cpu1` -> `gpu003`).

    `scontrol show hostnames` is the reference; the parser covers the common forms for
    nodes where scontrol is not on PATH.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # The first host expression: up to the first comma outside brackets; then every bracket
    # group (`[003-005,007]`) is replaced by its first member (`003`).
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    head = nodelist[:end].strip()
    if not head or head.startswith("[") or depth < 0:
        raise ValueError(f"cannot parse the Slurm node list {nodelist!r}")
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], head)


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(
            f"environment variable {name}={environ[name]!r} is not an integer"
        ) from None


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            # One port per job, so two jobs sharing a node do not collide.
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
            launcher="srun",
        )
    if "MASTER_PORT" not in env:
        # A lone process still opens a (one-rank) group; two of them on one machine (a run
        # and an eval, two test sessions) would collide on a fixed default port.
        port = free_ports(1)[0]
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct TCP ports that are free now, chosen by the OS (bind to port 0), for a
    process's rendezvous (MASTER_PORT) when no launcher picks one: fixed ports collide when two
    runs share a machine. The ports are released on return, so hand them on at once; between
    that and the bind another program could take one, which the OS's choice makes unlikely."""
    socks = []
    try:
        for _ in range(count):  # all held open while picking, so they differ
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def init_process_group(dist_env: DistEnv, timeout_s: int = 1800) -> torch.device:
    """Export the torch rendezvous variables and start a plain torch process group (NCCL with
    a GPU, else gloo); return our device. The trainer starts its group through DeepSpeed
    instead (training.launch), which picks the backend of its accelerator.

    A single process starts no group and leaves the environment alone: it may be a library
    call inside a longer-lived process whose children must not inherit RANK=0, WORLD_SIZE=1."""
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
        device = torch.device("cuda", dist_env.local_rank)
    else:
        device = torch.device("cpu")
    if dist_env.world_size > 1 and not torch.distributed.is_initialized():
        export_env(dist_env)
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
    return device


def export_env(dist_env: DistEnv) -> None:
    """The variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
    os.environ.update(
        RANK=str(dist_env.rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_RANK=str(dist_env.local_rank),
        # Ranks on this node (DeepSpeed's CPU accelerator sizes its shared-memory ops by it).
        LOCAL_SIZE=os.environ.get("LOCAL_SIZE")
        or os.environ.get("LOCAL_WORLD_SIZE")
        or os.environ.get("SLURM_NTASKS_PER_NODE")
        or str(dist_env.world_size),
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(dist_env.master_port),
    )


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank (one tiny all-reduce)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    t = t.to(_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def any_true(flag: bool) -> bool:
    return not all_true(not flag)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def all_gather_rows(values: list[float]) -> list[list[float]]:
    """Every rank's `values` (same length everywhere), on every rank, as (world, n) lists."""
    row = torch.tensor(values, dtype=torch.float64)
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [row.tolist()]
    row = row.to(_comm_device())
    rows = [torch.empty_like(row) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(rows, row)
    return torch.stack(rows).cpu().tolist()


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, on every rank (small JSON-able data only)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
