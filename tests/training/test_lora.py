"""LoRA fine-tuning (training.lora, peft) and its exports, on real components.

The unit tests put peft adapters on a randomised tiny MMDiT and compare, numerically in fp32,
our adapted model, the merged weights (mmdit.lora) and diffusers' SD3Transformer2DModel with
the exported LoRA loaded by diffusers' own loader. The training tests run real 2-rank gloo
DeepSpeed jobs (ZeRO-3 and ZeRO-1) once per module and check what trains, exact resume, and
the round trip of the trained LoRA through StableDiffusion3Pipeline.load_lora_weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmdit import convert
from mmdit import lora as lora_weights
from mmdit.checkpoints import resolve_checkpoint
from mmdit.model import MMDiT
from mmdit.weights import load_checkpoint_lora, load_weights
from tests.mmdit.tiny_mmdit import inputs, randomize, tiny
from tests.training.conftest import losses, read_metrics, run_training, train_overrides
from training.config import LORA_BLOCK_TARGETS, LORA_TOP_TARGETS, LoraConfig
from training.export import LORA_WEIGHTS, main
from training.lora import add_lora, target_pattern

ATOL = 1e-5
ALL_TARGETS = LORA_BLOCK_TARGETS + LORA_TOP_TARGETS


def diffusers_forward(transformer, latents, sigma, ctx, pooled) -> torch.Tensor:
    with torch.no_grad():
        return transformer.eval()(
            hidden_states=latents,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample


def diffusers_transformer(state_dict, config):
    from diffusers import SD3Transformer2DModel

    dcfg, dsd = convert.to_diffusers(state_dict, config)
    model = SD3Transformer2DModel(**dcfg)
    model.load_state_dict(dsd)
    return model


# ---- config -------------------------------------------------------------------------------


def test_config_rejects_unknown_targets_and_bad_values():
    with pytest.raises(ValueError, match=r"lora.targets=\['attn.q'\].*attn.qkv"):
        LoraConfig(rank=4, targets=("attn.q",))
    with pytest.raises(ValueError, match="lora.rank=-1"):
        LoraConfig(rank=-1)
    with pytest.raises(ValueError, match="lora.dropout=1.0"):
        LoraConfig(rank=4, dropout=1.0)
    assert LoraConfig(rank=8, alpha=4).scale == 0.5 and LoraConfig(rank=8).scale == 1.0


def test_target_pattern_matches_our_module_names():
    import re

    pattern = target_pattern(("attn.qkv", "mlp.fc1", "final_layer.linear"))
    assert re.fullmatch(pattern, "blocks.12.context.attn.qkv")
    assert re.fullmatch(pattern, "blocks.0.x.mlp.fc1")
    assert re.fullmatch(pattern, "final_layer.linear")
    assert not re.fullmatch(pattern, "blocks.0.x.attn2.qkv")
    assert not re.fullmatch(pattern, "blocks.0.x.attn.proj")
    assert not re.fullmatch(pattern, "final_layer.modulation")


def test_init_choices_and_dropout_reach_peft():
    config = tiny(depth=2)
    for init, check in (
        ("default", lambda a: a.abs().max() <= (1 / a.shape[1]) ** 0.5 + 1e-6),  # Kaiming-uniform
        ("gaussian", lambda a: abs(a.std().item() - 1 / 4) < 0.05),  # normal(0, 1 / rank)
    ):
        model = add_lora(MMDiT(config), LoraConfig(rank=4, init=init, dropout=0.1), seed=0)
        qkv = model.blocks[0].x.attn.qkv
        assert check(qkv.lora_A["default"].weight), init
        assert torch.count_nonzero(qkv.lora_B["default"].weight) == 0  # starts as the base
        assert qkv.lora_dropout["default"].p == 0.1 and qkv.scaling["default"] == 1.0
    with pytest.raises(ValueError, match="matched no Linear"):
        add_lora(MMDiT(config), LoraConfig(rank=2, targets=("attn2.qkv",)), seed=0)


# ---- numerics: peft model == merged weights == diffusers with the exported LoRA ------------


@pytest.fixture(scope="module")
def adapted():
    """A randomised depth-3 MMDiT (QK-norm, a dual-attention block, the context_pre_only last
    block) with rank-3 adapters on every target and random B (peft starts B at zero)."""
    config = tiny(qk_norm="rms_norm", dual_attention_layers=(0,))
    model = randomize(MMDiT(config))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(rank=3, alpha=6.0, targets=ALL_TARGETS)
    add_lora(model, lora, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return config, model.eval(), base, lora


def test_only_adapters_train_and_every_target_is_wrapped(adapted):
    config, model, base, lora = adapted
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _, found = lora_weights.split(model.state_dict())
    # 2 streams x (qkv, proj, fc1, fc2, modulation) per block, less the last block's text
    # stream (qkv and modulation only), plus attn2 in block 0 and 3 top-level layers.
    assert len(found) == 2 * 5 + 2 * 5 + (5 + 2) + 2 + 3
    assert "blocks.2.context.attn.qkv" in found and "blocks.0.x.attn2.proj" in found


def test_merged_weights_compute_what_the_adapted_model_computes(adapted):
    config, model, base, lora = adapted
    args = inputs(config)
    with torch.no_grad():
        ours = model(*args)
        plain = MMDiT(config, initialize=False)
        plain.load_state_dict(base)
        unadapted = plain.eval()(*args)
    split_base, found = lora_weights.split(model.state_dict())
    assert sorted(split_base) == sorted(base)
    merged = MMDiT(config, initialize=False)
    merged.load_state_dict(lora_weights.merge(split_base, found, lora.scale))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(*args), ours, atol=ATOL, rtol=0)
    assert (ours - unadapted).abs().max() > 100 * ATOL  # the LoRA changes the output


def test_diffusers_loads_the_exported_lora_and_matches(adapted):
    config, model, base, lora = adapted
    _, found = lora_weights.split(model.state_dict())
    state = convert.to_diffusers_lora(lora_weights.scaled(found, lora.scale), config)
    assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in state
    assert "transformer.transformer_blocks.2.norm1_context.linear.lora_B.weight" in state
    theirs = diffusers_transformer(base, config)
    theirs.load_lora_adapter(state, prefix="transformer")
    args = inputs(config)
    with torch.no_grad():
        ours = model(*args)
    torch.testing.assert_close(diffusers_forward(theirs, *args), ours, atol=ATOL, rtol=0)


# ---- training: 2 gloo ranks, ZeRO-3 and ZeRO-1 ----------------------------------------------

LORA_TARGETS = "[attn.qkv,attn.proj,modulation,final_layer.linear,final_layer.modulation]"
STEPS = 4


def lora_args(run: Path, shards: Path, components: Path, **extra) -> list[str]:
    # A fresh MMDiT is the zero function (adaLN-Zero), so attention adapters alone would get
    # no gradient: the modulation and final-layer adapters open the path (in real use the
    # base comes from train.init_from). lr 1e-2 moves every B well away from zero.
    settings = {
        "lora.rank": 4,
        "lora.alpha": 8,
        "lora.targets": LORA_TARGETS,
        "train.precision": "fp32",
        "train.lr": 1e-2,
        "train.max_steps": STEPS,
        "train.checkpoint_every": 2,
        **extra,
    }
    return [
        "--config",
        "configs/debug_cpu.yaml",
        *train_overrides(run, shards, components, **settings),
    ]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, digit_shards, tiny_components) -> Path:
    run = tmp_path_factory.mktemp("lora_z3") / "run"
    result = run_training(2, lora_args(run, digit_shards, tiny_components), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "LoRA: " in result.stderr  # the trainable-parameter count is logged
    return run


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, digit_shards, tiny_components) -> Path:
    """The same job stopped after step 2 (max_steps=2) and rerun to step 4."""
    run = tmp_path_factory.mktemp("lora_resumed") / "run"
    first = lora_args(run, digit_shards, tiny_components, **{"train.max_steps": 2})
    result = run_training(2, first, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    result = run_training(2, lora_args(run, digit_shards, tiny_components), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stderr
    return run


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory, digit_shards, tiny_components) -> Path:
    run = tmp_path_factory.mktemp("lora_z1") / "run"
    # Validation and a preview grid run off the clock on the EMA (base + averaged adapters):
    # they change no training number.
    extra = {
        "train.zero_stage": 1,
        "train.preview_every": STEPS,
        "eval.val_shards": str(digit_shards),
        "eval.val_every": 2,
        "eval.val_samples": 8,
        "eval.sample_steps": 2,
    }
    args = lora_args(run, digit_shards, tiny_components, **extra)
    result = run_training(2, args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return run


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("run", ["zero3_run", "zero1_run"])
def test_only_the_adapters_change_and_the_ema_holds_them(run, request):
    run = request.getfixturevalue(run)
    step2, step4 = (resolve_checkpoint(f"{run}:{s}") for s in (2, STEPS))
    _, base2, lora2, scale = load_checkpoint_lora(step2)
    _, base4, lora4, _ = load_checkpoint_lora(step4)
    assert scale == 2.0  # alpha 8 / rank 4
    for k in base2:  # the frozen base is saved and never changes
        assert torch.equal(base2[k], base4[k]), k
    assert len(lora4) == 13
    for module, (_, b) in lora4.items():
        assert b.abs().max() > 1e-3, module  # every B trained away from peft's zero
        assert not torch.equal(b, lora2[module][1]), module
    with safe_open(str(step4 / "ema_rank_00000_of_00002.safetensors"), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    assert shapes and all(".lora_A." in n or ".lora_B." in n for n in shapes)
    _, _, ema_lora, _ = load_checkpoint_lora(step4, ema=True)
    assert sorted(ema_lora) == sorted(lora4)
    assert not torch.equal(ema_lora["final_layer.linear"][1], lora4["final_layer.linear"][1])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_resume_continues_the_same_losses(zero3_run, resumed_run):
    uninterrupted, resumed = losses(zero3_run), losses(resumed_run)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    assert resumed == uninterrupted  # exactly


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_zero1_trains_the_same_lora_as_zero3(zero3_run, zero1_run):
    a, b = losses(zero3_run), losses(zero1_run)
    assert sorted(a) == sorted(b)
    assert b == a  # exactly: fp32 on the CPU, the same adapters and updates
    # Validation and previews in a LoRA run use base + the adapters' EMA.
    val = {
        step: row["val_loss"] for step, row in read_metrics(zero1_run).items() if "val_loss" in row
    }
    assert sorted(val) == [0, 2, 4] and val[4] != val[0]
    assert (zero1_run / "previews" / f"step_{STEPS:08d}.png").is_file()
    _, base3, lora3, _ = load_checkpoint_lora(resolve_checkpoint(zero3_run))
    # ZeRO-1 keeps frozen weights only in its module state (mmdit.checkpoints reads it there).
    _, base1, lora1, _ = load_checkpoint_lora(resolve_checkpoint(zero1_run))
    assert all(torch.equal(base1[k], base3[k]) for k in base3)
    for module, (a3, b3) in lora3.items():
        assert torch.equal(lora1[module][0], a3) and torch.equal(lora1[module][1], b3), module


def export(*args) -> None:
    assert main([str(a) for a in args]) == 0


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trained_lora_round_trips_through_diffusers(zero3_run, tiny_components, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    config, base, lora, scale = load_checkpoint_lora(resolve_checkpoint(zero3_run))
    ours_merged = MMDiT(config, initialize=False)
    ours_merged.load_state_dict(lora_weights.merge(base, lora, scale))
    args = inputs(config, h=8, w=8)
    with torch.no_grad():
        expected = ours_merged.eval()(*args)
        plain = MMDiT(config, initialize=False)
        plain.load_state_dict(base)
        assert (expected - plain.eval()(*args)).abs().max() > 100 * ATOL

    # The adapters alone, loaded by the pipeline's own LoRA loader onto the base model.
    out = tmp_path / "lora"
    export("--checkpoint", zero3_run, "--format", "diffusers-lora", "--out", out)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny_components, transformer=diffusers_transformer(base, config)
    )
    pipe.load_lora_weights(out)
    with safe_open(str(out / LORA_WEIGHTS), "pt") as f:
        assert f.metadata()["mmdit_lora_scale"] == "2.0"
    torch.testing.assert_close(
        diffusers_forward(pipe.transformer, *args), expected, atol=ATOL, rtol=0
    )

    # Merged weights: diffusers folder, SD3 single file and our safetensors agree.
    merged = tmp_path / "merged"
    export("--checkpoint", zero3_run, "--format", "diffusers", "--merge-lora", "--out", merged)
    theirs = SD3Transformer2DModel.from_pretrained(merged)
    torch.testing.assert_close(diffusers_forward(theirs, *args), expected, atol=ATOL, rtol=0)
    single = tmp_path / "merged_sd3.safetensors"
    export("--checkpoint", zero3_run, "--format", "sd3", "--merge-lora", "--out", single)
    with torch.no_grad():
        got = load_weights(single).model()(*args)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Sampling and evaluation read a LoRA run as its merged model.
    with torch.no_grad():
        got = load_weights(zero3_run).model()(*args)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lora_exports_say_what_to_pass(zero3_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            ["--checkpoint", str(zero3_run), "--format", "diffusers", "--out", str(tmp_path / "o")]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is a LoRA run: pass --merge-lora" in err and "--format diffusers-lora" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lora_on_weights_from_init_from_trains_the_attention_adapters(
    reference_run, digit_shards, tiny_components, tmp_path
):
    """The fine-tuning path in the default precision: base weights from another run
    (train.init_from, its EMA), frozen in bf16, and adapters on the attention projections
    only, which a trained base lets learn."""
    run = tmp_path / "run"
    extra = {
        "train.init_from": str(reference_run),
        "lora.targets": "[attn.qkv,attn.proj]",
        "train.precision": "bf16",
        "train.max_steps": 2,
    }
    result = run_training(2, lora_args(run, digit_shards, tiny_components, **extra), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    source = load_weights(str(reference_run), ema=True).state_dict
    _, base, adapters, _ = load_checkpoint_lora(resolve_checkpoint(f"{run}:2"))
    trained = {k for k in source if "pos_embed" not in k}
    assert trained <= set(base)
    for k in trained:  # the frozen base is the source's EMA rounded once to bf16
        assert torch.equal(base[k].float(), source[k].to(torch.bfloat16).float()), k
    # Block 0: both streams' qkv and proj; block 1 (context_pre_only): no text output proj.
    assert len(adapters) == 7 and all(m.endswith(("attn.qkv", "attn.proj")) for m in adapters)
    for module, (_, b) in adapters.items():
        assert b.abs().max() > 1e-3, module  # every B trained away from peft's zero
