"""The model a run starts from: the same initial weights on every rank, for every ZeRO stage
and precision, either freshly initialised or copied from train.init_from's source."""

from __future__ import annotations

import torch

from mmdit.model import JointBlock, MMDiT, MMDiTConfig
from training import init_from


def build_model(
    config: MMDiTConfig,
    ds_config: dict,
    *,
    seed: int,
    zero3: bool,
    init_source: init_from.InitSource | None,
    rank: int,
) -> MMDiT:
    """initialize_weights draws fp32 values from the global generator, seeded right before
    it (building the modules consumes random numbers differently per dtype). Under ZeRO-3 the
    parameters are sharded from birth (deepspeed.zero.Init with `ds_config`)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    if not zero3:
        model = MMDiT(config, initialize=False)  # replicated: every rank builds the same
        torch.manual_seed(seed)
        if init_source is None:
            model.initialize_weights()
        else:
            init_from.copy_into_module(model, init_source, rank, zero3=False)
        return model
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None):
        model = MMDiT(config, initialize=False)
    # Gather one part at a time, initialise it on rank 0 and let DeepSpeed scatter the result
    # (modifier_rank=0 broadcasts it). The parts and their order are those of
    # initialize_weights().
    torch.manual_seed(seed)
    if init_source is not None:
        init_from.copy_into_module(model, init_source, rank, zero3=True)
    for part in model.weight_init_parts() if init_source is None else ():
        params = list(part.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                model.initialize_weights([part])
    model.initialize_weights([])  # the fixed position table (a buffer, not sharded)
    # Gather each block's parameters in one go instead of one Linear at a time.
    set_z3_leaf_modules(model, [JointBlock])
    return model
