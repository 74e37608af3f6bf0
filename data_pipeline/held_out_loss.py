"""The validation loss of a model on held-out shards: the one computation behind the trainer's
`val_loss` and mmdit-eval's, so the curve in metrics.jsonl and the eval table agree.

eval_samples' ordered pass -> deterministic model inputs (model_inputs.held_out_inputs) ->
mmdit.val_loss's fixed-sigma, fixed-noise losses, each rank evaluating its share; the shares and
the bad-sample counts are then merged. It lives here, below both the trainer and the evaluator,
because it needs the held-out data (mmdit, below, never reads shards).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from data_pipeline.bad_samples import BadSampleCounter
from data_pipeline.config import DataConfig
from data_pipeline.eval_samples import eval_batches, shard_mode
from data_pipeline.model_inputs import held_out_inputs
from mmdit.conditioning import VAE, TextEncoders
from mmdit.val_loss import ValLoss, per_sample_losses, reduce_losses


def held_out_loss(
    model_fn: Callable[..., torch.Tensor],
    data: DataConfig,
    shards: str,
    vae: VAE,
    text_encoders: TextEncoders | None,
    *,
    samples: int,
    bins: int,
    noise_seed: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[object], list] = lambda obj: [obj],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ValLoss:
    """The validation loss of `model_fn` on the first `samples` (0 = all) samples of `shards`,
    this rank evaluating its share; `gather` (a collective returning every rank's object, e.g.
    mmdit.distributed.gather_objects) merges the shares. Raw shards need `text_encoders`;
    cached ones carry their embeddings (None will do)."""
    counter = BadSampleCounter()
    batches = eval_batches(
        data,
        shards,
        mode=shard_mode(shards),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        limit=samples or None,
        counter=counter,
    )
    to_inputs = held_out_inputs(vae, text_encoders)
    losses = per_sample_losses(
        model_fn,
        (to_inputs(batch) for batch in batches),
        bins=bins,
        noise_seed=noise_seed,
        device=device,
        dtype=dtype,
    )
    merged: dict[int, list[float]] = {}
    total = BadSampleCounter()
    for part, counts in gather((losses, counter.as_dict())):
        merged.update({int(k): v for k, v in part.items()})
        total.merge(counts)
    bad = {reason: n for reason, n in total.bad.items() if n}
    return reduce_losses(merged, bins=bins, noise_seed=noise_seed, bad=bad)
