"""The derived DeepSpeed JSON, AdamW parameter groups, the LR schedule and the optimizer
repair after a universal-checkpoint load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from data_pipeline.config import DataConfig
from mmdit.model import MMDiT, MMDiTConfig
from tests.mmdit.tiny_mmdit import tiny
from training.config import RunConfig, TrainConfig
from training.ds_config import accumulation_steps, deepspeed_config, global_batch
from training.optim import (
    GROUP_NAMES,
    build_optimizer,
    lr_at,
    no_decay_names,
    param_groups,
    repair_after_load,
)

# -- batch arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "accumulation"), [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_accumulation_keeps_the_global_batch_fixed(world, accumulation):
    train = TrainConfig(micro_batch_size=4, global_batch_size=64)
    assert accumulation_steps(train, world) == accumulation
    assert global_batch(train, world) == 64


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_no_global_batch_means_no_accumulation(world):
    train = TrainConfig(micro_batch_size=3, global_batch_size=0)
    assert accumulation_steps(train, world) == 1
    assert global_batch(train, world) == 3 * world


@pytest.mark.parametrize("world", [3, 5, 32])
def test_indivisible_global_batch_is_a_clear_error(world):
    train = TrainConfig(micro_batch_size=4, global_batch_size=64)
    with pytest.raises(ValueError, match=r"global_batch_size=64") as info:
        accumulation_steps(train, world)
    assert f"4 x {world}" in str(info.value)
    with pytest.raises(ValueError):
        global_batch(train, world)


# -- DeepSpeed dict --------------------------------------------------------------------------


@pytest.mark.parametrize("h", [64, 128, 192])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_deepspeed_config_derives_from_the_run_config(h, precision):
    model = tiny(hidden_size=h, num_heads=h // 64, dual_attention_layers=(0,))
    train = TrainConfig(
        micro_batch_size=2, global_batch_size=24, precision=precision, grad_clip=0.5
    )
    data = DataConfig(resolution=64)  # buckets within the tiny model's position grid
    cfg = deepspeed_config(RunConfig(model=model, data=data, train=train), world_size=3)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 24
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": precision == "bf16"}
    assert cfg["fp16"] == {"enabled": False}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    # ZeRO-3 gathers one block at a time: the prefetch must hold the whole next block,
    # the largest of them (the dual-attention one here), counted off a real model.
    largest = max(sum(p.numel() for p in b.parameters()) for b in MMDiT(model).blocks)
    assert zero["stage3_prefetch_bucket_size"] >= largest
    assert zero["reduce_bucket_size"] >= largest
    assert zero["stage3_param_persistence_threshold"] == 10 * h
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # Never DeepSpeed's process-wide replacement of F.linear (slower, opaque to compile).
    assert zero["memory_efficient_linear"] is False
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert cfg["checkpoint"] == {"load_universal": False}


def test_deepspeed_config_numbers_for_d2_and_universal_flag():
    cfg = deepspeed_config(RunConfig(), world_size=2, load_universal=True)
    zero = cfg["zero_optimization"]
    # d2 (hidden 128): the largest block is a full one, 36 h^2 weights + 30 h biases.
    block = 36 * 128 * 128 + 30 * 128
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (block, block)
    assert zero["stage3_param_persistence_threshold"] == 1280
    assert cfg["checkpoint"]["load_universal"] is True
    # default train config: micro 4, no accumulation
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (8, 1)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_get_all_gather_buckets_and_no_stage3_keys(stage):
    run = RunConfig(train=TrainConfig(zero_stage=stage, offload_optimizer=True))
    zero = deepspeed_config(run, world_size=2)["zero_optimization"]
    assert zero["stage"] == stage and zero["allgather_bucket_size"] == zero["reduce_bucket_size"]
    assert not any(k.startswith("stage3_") for k in zero)
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_offloading_parameters_needs_zero3():
    run = RunConfig(train=TrainConfig(offload_params=True, offload_optimizer=True))
    zero = deepspeed_config(run, world_size=2)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    with pytest.raises(ValueError, match="offload_params needs zero_stage=3"):
        TrainConfig(zero_stage=2, offload_params=True)


def test_deepspeed_config_rejects_indivisible_global_batch():
    run = RunConfig(train=TrainConfig(micro_batch_size=4, global_batch_size=16))
    with pytest.raises(ValueError, match="not a multiple"):
        deepspeed_config(run, world_size=3)


# -- param groups ----------------------------------------------------------------------------


def _check_partition(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    decay = [ids[id(p)] for p in groups[0]["params"]]
    no_decay = [ids[id(p)] for p in groups[1]["params"]]
    assert len(decay) == len(set(decay)) and len(no_decay) == len(set(no_decay))
    assert not set(decay) & set(no_decay)
    assert set(decay) | set(no_decay) == set(ids.values())
    return set(decay), set(no_decay)


@pytest.mark.parametrize(
    "config",
    [MMDiTConfig.preset("d2"), tiny(depth=2, qk_norm="rms_norm")],
    ids=["d2", "tiny-rmsnorm"],
)
def test_param_groups_on_mmdit(config):
    model = MMDiT(config)
    groups = param_groups(model, weight_decay=0.05)
    assert [g["name"] for g in groups] == list(GROUP_NAMES)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = _check_partition(model, groups)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for name in no_decay:
        assert len(shapes[name]) == 1 or "pos_embed" in name, name
    for name in decay:
        assert len(shapes[name]) >= 2, name
    assert any(n.endswith(".bias") for n in no_decay)
    assert "x_embedder.weight" in decay  # the 4-D patch conv
    if config.qk_norm == "rms_norm":
        assert any("ln_q" in n for n in no_decay)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 9, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_exempt_embeddings_position_tables_and_skip_frozen():
    model = _Toy()
    assert no_decay_names(model) == {
        "embed.weight",
        "pos_embed",
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "frozen.bias",
    }
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups[0]["params"]] == ["proj.weight"]
    assert {names[id(p)] for p in groups[1]["params"]} == {
        "embed.weight",
        "pos_embed",
        "proj.bias",
        "norm.weight",
        "norm.bias",
    }


def test_param_groups_use_zero3_true_shape():
    """Under ZeRO-3 a partitioned parameter is an empty 1-D tensor; ds_shape holds the truth."""
    model = nn.Linear(8, 8)
    model.weight.data = torch.empty(0)
    model.weight.ds_shape = torch.Size([8, 8])
    model.bias.data = torch.empty(0)
    model.bias.ds_shape = torch.Size([8])
    assert no_decay_names(model) == {"bias"}


def test_build_optimizer_on_cpu():
    model = _Toy()
    train = TrainConfig(lr=3e-4, weight_decay=0.2, betas=(0.8, 0.95), eps=1e-6)
    opt = build_optimizer(model, train, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert all(g["lr"] == 3e-4 and tuple(g["betas"]) == (0.8, 0.95) for g in opt.param_groups)
    assert all(g["eps"] == 1e-6 for g in opt.param_groups)


# -- learning-rate schedule ------------------------------------------------------------------


def test_lr_warmup_then_constant():
    train = TrainConfig(lr=1e-3, warmup_steps=4, lr_schedule="constant", max_steps=100)
    assert [lr_at(s, train) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(lr_at(s, train) == 1e-3 for s in (4, 5, 50, 99, 100, 1000))


def test_lr_without_warmup_starts_at_peak():
    train = TrainConfig(lr=2e-4, warmup_steps=0, lr_schedule="constant")
    assert lr_at(0, train) == 2e-4
    cos = TrainConfig(lr=2e-4, warmup_steps=0, lr_schedule="cosine", max_steps=10)
    assert lr_at(0, cos) == pytest.approx(2e-4)
    assert lr_at(10, cos) == pytest.approx(2e-5)


def test_lr_cosine_endpoints_and_monotone_decay():
    train = TrainConfig(
        lr=1e-3, warmup_steps=10, lr_schedule="cosine", max_steps=110, min_lr_ratio=0.1
    )
    assert lr_at(0, train) == pytest.approx(1e-4)
    assert lr_at(9, train) == pytest.approx(1e-3)  # last warmup step reaches the peak
    assert lr_at(10, train) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, train) == pytest.approx(0.5 * (1e-3 + 1e-4))  # half way
    assert lr_at(110, train) == pytest.approx(1e-4)
    assert lr_at(500, train) == pytest.approx(1e-4)  # stays on the floor past max_steps
    cosine = [lr_at(s, train) for s in range(10, 111)]
    assert all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    warm = [lr_at(s, train) for s in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False))
    expected = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_at(35, train) == pytest.approx(expected)


# -- repair after a universal load -----------------------------------------------------------


def _two_group_adamw(foreach: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2, foreach=foreach)
    return model, opt


def _step(model, opt):
    opt.zero_grad()
    model(torch.ones(2, 3)).square().sum().backward()
    opt.step()


def _simulate_universal_load(opt):
    """What DeepSpeed 0.19's universal load leaves behind: one step tensor shared by every
    parameter state, and group 0's settings copied onto group 1."""
    shared = torch.tensor(1.0)
    for state in opt.state.values():
        state["step"] = shared
    g0 = opt.param_groups[0]
    for g in opt.param_groups[1:]:
        g.update(weight_decay=g0["weight_decay"], betas=(0.5, 0.5), eps=1.0, name="decay")
    return shared


@pytest.mark.parametrize("foreach", [True, False])
def test_shared_step_tensor_runs_ahead_without_repair(foreach):
    """The failure mode the repair exists for (guards the simulation below)."""
    model, opt = _two_group_adamw(foreach)
    _step(model, opt)
    shared = _simulate_universal_load(opt)
    _step(model, opt)
    assert shared.item() > 2.0  # incremented once per parameter, not once per step


@pytest.mark.parametrize("foreach", [True, False])
def test_repair_after_load_unties_steps_and_rewrites_groups(foreach):
    model, opt = _two_group_adamw(foreach)
    _step(model, opt)
    _simulate_universal_load(opt)
    train = TrainConfig(weight_decay=0.03, betas=(0.9, 0.95), eps=1e-7)
    repair_after_load(opt, train)

    steps = [s["step"] for s in opt.state.values()]
    assert len(steps) == 4
    assert len({id(t) for t in steps}) == 4
    assert all(t.item() == 1.0 for t in steps)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.03, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in opt.param_groups)
    assert all(g["eps"] == 1e-7 for g in opt.param_groups)

    for expected in (2.0, 3.0, 4.0):
        _step(model, opt)
        assert [s["step"].item() for s in opt.state.values()] == [expected] * 4


def test_repair_after_load_matches_an_untouched_optimizer():
    """After repair, continuing training gives the same weights as never having been broken."""
    model_a, opt_a = _two_group_adamw(True)
    model_b, opt_b = _two_group_adamw(True)
    train = TrainConfig(weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(2):
        _step(model_a, opt_a)
        _step(model_b, opt_b)
    shared = _simulate_universal_load(opt_b)
    shared.fill_(2.0)
    repair_after_load(opt_b, train)
    for _ in range(3):
        _step(model_a, opt_a)
        _step(model_b, opt_b)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_repair_after_load_rejects_unexpected_group_count():
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match="expected 2 param groups, found 1"):
        repair_after_load(opt, TrainConfig())
