"""`train.compile`: torch.compile each joint block (regional compilation, as torchtitan does).

Why per block and not the whole model: the blocks are nearly all of the work and all alike, so
one compiled graph serves every block of a kind (dynamo guards on a block's settings, not on
its identity, and takes its weights as graph inputs); compile time is that of one or two blocks
however deep the model; and DeepSpeed's ZeRO-3 hooks, which gather a block's weights around
its call, stay outside the compiled code (only `forward` is compiled, not the module call).

Aspect buckets change the number of image tokens from batch to batch. The token dimension is
marked dynamic on every call, so the first graph is already shape-generic and a new bucket
does not recompile (`compile_count` reports how many graphs were built).
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs) -> None:
    """Replace each of `model.blocks`' forward with a compiled one (in place)."""
    for block in model.blocks:
        block.forward = _token_dynamic(torch.compile(block.forward, **compile_kwargs))


def _token_dynamic(compiled):
    def forward(x, ctx, c, key_mask=None):
        torch._dynamo.maybe_mark_dynamic(x, 1)  # (B, N, D): N varies with the bucket
        return compiled(x, ctx, c, key_mask)

    return forward


def compile_count() -> int:
    """Graphs dynamo has compiled in this process so far (first compiles and recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
