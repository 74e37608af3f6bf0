"""Weight conversion, proven numerically: our MMDiT vs diffusers' SD3Transformer2DModel (fp32).

Every parity test randomises all weights first: a fresh MMDiT is the zero function, and a
conversion that got an order or a key wrong would still "agree" on zeros.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from mmdit import MMDiT
from mmdit.convert import (
    config_from_diffusers,
    from_diffusers,
    from_sd3_single_file,
    load_diffusers,
    save_diffusers,
    to_diffusers,
    to_sd3_single_file,
)
from tests.mmdit.tiny_mmdit import inputs, randomize, tiny

ATOL = 1e-5

CONFIGS = {
    "plain": dict(),
    "qk_norm": dict(qk_norm="rms_norm"),
    "dual_qk": dict(qk_norm="rms_norm", dual_attention_layers=(0, 2)),
    "dual_last_4deep": dict(depth=4, dual_attention_layers=(1, 3), out_channels=8),
}


def run_diffusers(model: SD3Transformer2DModel, x, sigma, ctx, pooled) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=x,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            timestep=sigma * 1000,  # diffusers takes t = 1000·σ
        ).sample


def run_ours(model: MMDiT, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert a.abs().max() > 0.1  # a zero or tiny output would prove nothing
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# diffusers, both directions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_to_diffusers_same_output(name):
    cfg = tiny(**CONFIGS[name])
    ours = randomize(MMDiT(cfg)).eval()
    dcfg, dsd = to_diffusers(ours.state_dict(), cfg)
    theirs = SD3Transformer2DModel(**dcfg).eval()
    theirs.load_state_dict(dsd, strict=True)
    args = inputs(cfg)  # 8x12: non-square
    assert_same(run_ours(ours, *args), run_diffusers(theirs, *args))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_to_ours_same_output(name):
    cfg = tiny(**CONFIGS[name])
    from mmdit.convert import diffusers_config

    theirs = randomize(SD3Transformer2DModel(**diffusers_config(cfg)), seed=3).eval()
    cfg2, sd = from_diffusers(theirs.state_dict(), dict(theirs.config))
    assert cfg2 == cfg
    ours = MMDiT(cfg2).eval()
    ours.load_state_dict(sd, strict=True)
    args = inputs(cfg, h=12, w=6)
    assert_same(run_ours(ours, *args), run_diffusers(theirs, *args))
    # Back again: the diffusers state dict is reproduced exactly.
    _, dsd = to_diffusers(ours.state_dict(), cfg2)
    ref = theirs.state_dict()
    assert dsd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(dsd[k], ref[k]), k


def test_context_mask_matches_diffusers_without_padding():
    # diffusers' SD3 has no text mask: compare our masked batch with diffusers on the unpadded
    # prompt, one sample at a time.
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(1,))
    ours = randomize(MMDiT(cfg)).eval()
    dcfg, dsd = to_diffusers(ours.state_dict(), cfg)
    theirs = SD3Transformer2DModel(**dcfg).eval()
    theirs.load_state_dict(dsd, strict=True)
    x, s, c, p = inputs(cfg, text=10)
    lengths = [4, 10]
    mask = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    c = torch.where(mask[..., None], c, torch.randn_like(c) * 50)
    masked = run_ours(ours, x, s, c, p, context_mask=mask)
    for b, n in enumerate(lengths):
        ref = run_diffusers(theirs, x[b : b + 1], s[b : b + 1], c[b : b + 1, :n], p[b : b + 1])
        assert_same(masked[b : b + 1], ref)


def test_pos_embed_buffer_is_diffusers_own():
    # The exported buffer must equal what diffusers computes itself for that config, so a
    # diffusers user who re-creates the model from config.json gets the same numbers.
    cfg = tiny(pos_embed_max_size=24, sample_size=128, hidden_size=96, num_heads=3)
    dcfg, dsd = to_diffusers(MMDiT(cfg).state_dict(), cfg)
    theirs = SD3Transformer2DModel(**dcfg)
    torch.testing.assert_close(
        dsd["pos_embed.pos_embed"], theirs.pos_embed.pos_embed, atol=1e-6, rtol=0
    )


def test_save_diffusers_from_pretrained_and_load(tmp_path):
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(0,))
    ours = randomize(MMDiT(cfg)).eval()
    save_diffusers(tmp_path / "transformer", ours.state_dict(), cfg)

    theirs, info = SD3Transformer2DModel.from_pretrained(
        tmp_path / "transformer", output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == [] and info["error_msgs"] == []
    args = inputs(cfg)
    assert_same(run_ours(ours, *args), run_diffusers(theirs.eval(), *args))

    # A pipeline folder (transformer/ inside) loads too, with the exact weights and config.
    cfg2, sd = load_diffusers(tmp_path)
    assert cfg2 == cfg
    ref = ours.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_load_diffusers_sharded(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny()
    ours = randomize(MMDiT(cfg))
    save_diffusers(tmp_path, ours.state_dict(), cfg)
    full = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(full)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for fname, ks in shards.items():
        save_file({k: full[k] for k in ks}, str(tmp_path / fname))
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    cfg2, sd = load_diffusers(tmp_path)
    assert cfg2 == cfg
    assert all(torch.equal(sd[k], v) for k, v in ours.state_dict().items())


# ---------------------------------------------------------------------------------------------
# SD3 single file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_single_file_through_diffusers_own_converter(name):
    cfg = tiny(**CONFIGS[name])
    ours = randomize(MMDiT(cfg)).eval()
    single = to_sd3_single_file(ours.state_dict(), cfg)
    assert all(k.startswith("model.diffusion_model.") for k in single)
    dsd = convert_sd3_transformer_checkpoint_to_diffusers(dict(single))
    theirs = SD3Transformer2DModel(**to_diffusers(ours.state_dict(), cfg)[0]).eval()
    theirs.load_state_dict(dsd, strict=True)
    args = inputs(cfg)
    assert_same(run_ours(ours, *args), run_diffusers(theirs, *args))


@pytest.mark.parametrize(
    "overrides, from_kwargs",
    [
        # head_dim 64 and no QK-norm: the head count is SD3's default guess
        (dict(hidden_size=128, num_heads=2, sample_size=128), {}),
        # QK-norm: the head count is read off ln_q's shape
        (dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)), dict(sample_size=16)),
        # neither: the caller says
        (dict(mlp_ratio=2.0), dict(num_heads=2, sample_size=16)),
    ],
)
def test_single_file_round_trip_is_exact(overrides, from_kwargs):
    cfg = tiny(**overrides)
    sd = randomize(MMDiT(cfg)).state_dict()
    single = to_sd3_single_file(sd, cfg)
    cfg2, sd2 = from_sd3_single_file(single, **from_kwargs)
    assert cfg2 == cfg
    assert sd2.keys() == sd.keys()
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)


def test_single_file_names_and_ignores_other_components():
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(0,))
    single = to_sd3_single_file(MMDiT(cfg).state_dict(), cfg)
    P = "model.diffusion_model."
    for name in [
        "pos_embed",
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.mlp.0.weight",
        "context_embedder.weight",
        "joint_blocks.0.x_block.adaLN_modulation.1.weight",
        "joint_blocks.0.x_block.attn.qkv.weight",
        "joint_blocks.0.x_block.attn.ln_q.weight",
        "joint_blocks.0.x_block.attn2.qkv.weight",
        "joint_blocks.0.x_block.attn2.proj.bias",
        "joint_blocks.0.context_block.attn.proj.weight",
        "joint_blocks.0.context_block.mlp.fc2.weight",
        "joint_blocks.2.context_block.attn.ln_k.weight",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
    ]:
        assert P + name in single, name
    assert P + "joint_blocks.2.context_block.attn.proj.weight" not in single
    assert P + "joint_blocks.2.context_block.mlp.fc1.weight" not in single
    D = cfg.hidden_size
    assert single[P + "joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (9 * D, D)
    assert single[P + "joint_blocks.2.context_block.adaLN_modulation.1.weight"].shape == (2 * D, D)
    # All-in-one files also carry text encoders and the VAE: those are not ours.
    extra = {
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(3),
        "first_stage_model.decoder.conv_in.weight": torch.ones(3),
    }
    cfg2, _ = from_sd3_single_file({**single, **extra}, sample_size=16)
    assert cfg2 == cfg


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_state_dicts_name_the_keys():
    cfg = tiny()
    sd = MMDiT(cfg).state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.x.mlp.fc1.weight"}
    with pytest.raises(ValueError, match=r"MMDiT state dict.*missing keys \[blocks\.1\.x\.mlp"):
        to_diffusers(missing, cfg)
    with pytest.raises(ValueError, match=r"unexpected keys \[blocks\.9\.foo\]"):
        to_sd3_single_file({**sd, "blocks.9.foo": torch.ones(1)}, cfg)
    bad = dict(sd)
    bad["context_embedder.weight"] = torch.ones(64, 32)
    with pytest.raises(ValueError, match=r"wrong shapes \[context_embedder\.weight: \(64, 32\)"):
        to_diffusers(bad, cfg)

    dcfg, dsd = to_diffusers(sd, cfg)
    dsd.pop("transformer_blocks.0.attn.to_k.bias")
    with pytest.raises(ValueError, match=r"diffusers.*missing keys \[transformer_blocks\.0\.attn"):
        from_diffusers(dsd, dcfg)
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
        from_diffusers(dsd, {**dcfg, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match=r"keys \['use_magic'\]"):
        config_from_diffusers({**dcfg, "use_magic": True})

    single = to_sd3_single_file(sd, cfg)
    single.pop("model.diffusion_model.joint_blocks.1.context_block.attn.qkv.bias")
    with pytest.raises(ValueError, match=r"single-file.*missing keys \[model\.diffusion_model\."):
        from_sd3_single_file(single, sample_size=16)
    with pytest.raises(ValueError, match="not an SD3 single-file MMDiT"):
        from_sd3_single_file({"model.diffusion_model.foo": torch.ones(1)})


def test_export_rejects_what_diffusers_cannot_express():
    cfg = tiny(mlp_ratio=2.0)
    with pytest.raises(ValueError, match="mlp_ratio=2.0"):
        to_diffusers(MMDiT(cfg).state_dict(), cfg)
