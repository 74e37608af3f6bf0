"""MMDiT model: config rules, shapes, init, masking, checkpointing, embeddings vs diffusers."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from mmdit import MMDiT, MMDiTConfig
from mmdit.model import sincos_pos_embed_2d, timestep_embedding
from tests.mmdit.tiny_mmdit import inputs, randomize, tiny

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_derives_sizes_and_reconstructs_equal():
    cfg = MMDiTConfig.from_depth(4)
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (256, 4, 64)
    assert cfg.caption_projection_dim == 256
    assert MMDiTConfig(**dataclasses.asdict(cfg)) == cfg
    cfg2 = MMDiTConfig.from_depth(4, dual_attention_layers=(2, 0))
    assert cfg2.dual_attention_layers == (0, 2)
    assert MMDiTConfig(**dataclasses.asdict(cfg2)) == cfg2


@pytest.mark.parametrize("d", [2, 4, 8, 15, 18, 21, 24, 30, 38])
def test_presets_follow_64d_rule(d):
    cfg = MMDiTConfig.preset(f"d{d}")
    assert cfg.depth == d
    assert cfg.hidden_size == 64 * d
    assert cfg.num_heads == d
    assert cfg.head_dim == 64
    assert cfg.mlp_ratio == 4.0
    assert cfg.pos_embed_max_size == 192
    assert cfg.qk_norm == ("rms_norm" if d == 38 else "none")


def test_preset_overrides_and_unknown_name():
    assert MMDiTConfig.preset("d24", qk_norm="rms_norm").qk_norm == "rms_norm"
    sd35m = MMDiTConfig.preset("sd3.5-medium")
    assert sd35m.dual_attention_layers == tuple(range(13))
    assert sd35m.pos_embed_max_size == 384
    with pytest.raises(ValueError, match="unknown MMDiT preset 'd7'"):
        MMDiTConfig.preset("d7")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(depth=0), "depth"),
        (dict(depth=4, hidden_size=250), "hidden_size"),
        (dict(depth=4, num_heads=3), "hidden_size"),
        (dict(depth=4, caption_projection_dim=128), "caption_projection_dim"),
        (dict(depth=4, dual_attention_layers=(1, 4)), "dual_attention_layers"),
        (dict(depth=4, dual_attention_layers=(-1,)), "dual_attention_layers"),
        (dict(depth=4, qk_norm="layer_norm"), "qk_norm"),
        (dict(depth=4, patch_size=0), "patch_size"),
        (dict(depth=4, mlp_ratio=0.0), "mlp_ratio"),
        (dict(depth=4, sample_size=1), "sample_size"),
    ],
)
def test_config_rejects_impossible_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"MMDiTConfig\.{field}"):
        MMDiTConfig(**kwargs)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["d24", "sd3.5-medium"])
def test_param_count_matches_diffusers(name):
    from diffusers import SD3Transformer2DModel

    from mmdit.convert import diffusers_config

    cfg = MMDiTConfig.preset(name)
    with torch.device("meta"):
        ours = _param_count(MMDiT(cfg))
        theirs = _param_count(SD3Transformer2DModel(**diffusers_config(cfg)))
    assert ours == theirs
    if name == "d24":  # SD3-medium's transformer: 2.03B
        assert 2.0e9 < ours < 2.1e9


# ---------------------------------------------------------------------------------------------
# Model structure and init
# ---------------------------------------------------------------------------------------------


def test_blocks_structure():
    cfg = tiny(depth=4, dual_attention_layers=(0, 3), qk_norm="rms_norm")
    model = MMDiT(cfg)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 4
    assert [b.context_pre_only for b in model.blocks] == [False, False, False, True]
    assert [b.dual_attention for b in model.blocks] == [True, False, False, True]
    last = model.blocks[-1]
    assert last.context.mlp is None and last.context.attn.proj is None
    assert last.context.modulation.out_features == 2 * cfg.hidden_size
    assert model.blocks[0].x.modulation.out_features == 9 * cfg.hidden_size
    assert model.blocks[0].x.attn.ln_q.weight.shape == (cfg.head_dim,)


def test_fresh_model_outputs_exactly_zero():
    cfg = tiny()
    model = MMDiT(cfg)
    out = model(*inputs(cfg, h=8, w=6))
    assert out.shape == (2, 16, 8, 6)
    assert torch.equal(out, torch.zeros_like(out))
    # ... but it is not dead: the output layer gets a gradient on the first step.
    out = model(*inputs(cfg))
    (out - 1).square().mean().backward()
    assert model.final_layer.linear.bias.grad.abs().sum() > 0


def test_init_from_meta_device_matches_normal_init():
    cfg = tiny()
    with torch.device("meta"):
        model = MMDiT(cfg)
    model.to_empty(device="cpu")
    model.initialize_weights()
    ref = MMDiT(cfg)
    assert torch.equal(model.pos_embed, ref.pos_embed)
    assert torch.equal(model(*inputs(cfg)), torch.zeros(2, 16, 8, 12))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


@pytest.mark.parametrize("h, w", [(8, 8), (4, 12), (16, 2), (32, 32)])
def test_output_shape_any_aspect(h, w):
    cfg = tiny(out_channels=8)
    model = randomize(MMDiT(cfg))
    out = model(*inputs(cfg, h=h, w=w))
    assert out.shape == (2, 8, h, w)
    assert out.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    cfg = tiny()
    model = MMDiT(cfg)
    x, s, c, p = inputs(cfg)
    with pytest.raises(ValueError, match="not divisible by patch_size=2"):
        model(torch.randn(2, 16, 9, 8), s, c, p)
    with pytest.raises(ValueError, match="pos_embed_max_size=16"):
        model(torch.randn(2, 16, 34, 8), s, c, p)
    with pytest.raises(ValueError, match=r"latents must be \(B, 16, H, W\)"):
        model(torch.randn(2, 4, 8, 8), s, c, p)
    with pytest.raises(ValueError, match="context must be"):
        model(x, s, torch.randn(2, 7, 32), p)
    with pytest.raises(ValueError, match="pooled must be"):
        model(x, s, c, torch.randn(2, 5))
    with pytest.raises(ValueError, match="sigma must be"):
        model(x, torch.rand(3), c, p)
    with pytest.raises(ValueError, match="context_mask must be a bool"):
        model(x, s, c, p, context_mask=torch.ones(2, 7))


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="attention_backend: 'flash3' is unknown"):
        tiny(attention_backend="flash3")
    for backend, package in (("flash_attn", "flash_attn"), ("xformers", "xformers")):
        try:
            __import__(package)
            continue  # installed: the gpu tests cover it
        except ImportError:
            pass
        with pytest.raises(ImportError, match=f"attention_backend='{backend}' needs the {package}"):
            MMDiT(tiny(attention_backend=backend))


@pytest.mark.parametrize("backend", ["sdpa_math", "sdpa_flash"])
def test_cpu_sdpa_kernels_equal_the_default(backend):
    """The SDPA kernels a CPU can run give the default path's outputs and gradients."""
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(1,))
    ref = randomize(MMDiT(cfg))
    model = MMDiT(cfg.replace(attention_backend=backend))
    model.load_state_dict(ref.state_dict())
    args = inputs(cfg)
    out_a, grads_a = _loss_and_grads(ref, args)
    out_b, grads_b = _loss_and_grads(model, args)
    torch.testing.assert_close(out_a, out_b, atol=2e-6, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["sdpa_efficient", "sdpa_cudnn"])
def test_cuda_only_kernels_say_so_on_cpu(backend):
    cfg = tiny(attention_backend=backend)
    model = randomize(MMDiT(cfg))
    with pytest.raises(
        RuntimeError, match=f"'{backend}' only runs on CUDA.*use attention_backend='sdpa'"
    ):
        model(*inputs(cfg))


def test_readers_of_saved_weights_get_a_portable_config():
    cfg = tiny(attention_backend="sdpa_math")
    assert cfg.portable().attention_backend == "sdpa"
    assert cfg.same_weights_as(tiny()) and not cfg.same_weights_as(tiny(depth=2))


def test_xformers_bias_matches_sdpa_mask(monkeypatch):
    # No xformers/CUDA here: a stand-in kernel with xformers' (B, N, H, Dh) + additive-bias
    # contract checks the mask-to-bias translation, including Nq != Nk (the last block).
    import sys
    import types

    from mmdit import attention as attn

    def memory_efficient_attention(q, k, v, attn_bias=None):
        assert attn_bias is None or attn_bias.shape == (
            q.shape[0],
            q.shape[2],
            q.shape[1],
            k.shape[1],
        )
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        if attn_bias is not None:
            s = s + attn_bias
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 2, 8, generator=g)
    k, v = torch.randn(2, 2, 11, 2, 8, generator=g)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 6:] = False
    for m in (None, mask):
        ours = attn.xformers_attention(q, k, v, m).reshape(2, 5, 16)
        ref = attn.attention(q, k, v, m, "sdpa")
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    with pytest.raises(
        RuntimeError, match="'xformers' only runs on CUDA, but the model runs on cpu"
    ):
        attn.attention(q, k, v, mask, "xformers")


# ---------------------------------------------------------------------------------------------
# Embeddings: same numbers as diffusers
# ---------------------------------------------------------------------------------------------


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import Timesteps

    t = torch.tensor([0.0, 1.0, 17.5, 999.0, 1000.0])
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert torch.equal(timestep_embedding(t, 256), ref)


@pytest.mark.parametrize("hidden, grid, sample", [(64, 16, 16), (96, 24, 128), (1536, 192, 128)])
def test_pos_embed_table_matches_diffusers(hidden, grid, sample):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_pos_embed_2d(hidden, grid, sample // 2)
    ref = get_2d_sincos_pos_embed(hidden, grid, base_size=sample // 2, output_type="pt").float()
    assert ours.shape == (grid * grid, hidden)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("h, w", [(16, 16), (8, 8), (3, 16), (16, 5), (7, 10), (1, 1)])
def test_cropped_pos_embed_is_diffusers_centre_crop(h, w):
    from diffusers.models.embeddings import PatchEmbed

    cfg = tiny()
    model = MMDiT(cfg)
    pe = PatchEmbed(
        height=cfg.sample_size,
        width=cfg.sample_size,
        patch_size=2,
        in_channels=16,
        embed_dim=cfg.hidden_size,
        pos_embed_max_size=cfg.pos_embed_max_size,
    )
    pe.pos_embed.copy_(model.pos_embed)
    assert torch.equal(model.cropped_pos_embed(h, w), pe.cropped_pos_embed(2 * h, 2 * w))


# ---------------------------------------------------------------------------------------------
# Masking and checkpointing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dual", [(), (0, 2)])
def test_context_mask_equals_dropping_padded_tokens(dual):
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=dual)
    model = randomize(MMDiT(cfg)).eval()
    x, s, c, p = inputs(cfg, text=9)
    lengths = [5, 9]
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    c = torch.where(mask[..., None], c, 100 * torch.randn_like(c))  # loud garbage in padding
    with torch.no_grad():
        masked = model(x, s, c, p, context_mask=mask)
        unmasked = model(x, s, c, p)
        for b, n in enumerate(lengths):
            alone = model(x[b : b + 1], s[b : b + 1], c[b : b + 1, :n], p[b : b + 1])
            torch.testing.assert_close(masked[b : b + 1], alone, atol=1e-5, rtol=0)
    # Sample 0 has padding, so ignoring the mask must change its output.
    assert (masked[0] - unmasked[0]).abs().max() > 1e-3
    torch.testing.assert_close(masked[1], unmasked[1], atol=1e-5, rtol=0)


def test_all_true_mask_equals_no_mask():
    cfg = tiny()
    model = randomize(MMDiT(cfg)).eval()
    x, s, c, p = inputs(cfg)
    with torch.no_grad():
        a = model(x, s, c, p, context_mask=torch.ones(2, 7, dtype=torch.bool))
        b = model(x, s, c, p)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _loss_and_grads(model, args):
    model.zero_grad(set_to_none=True)
    out = model(*args)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@contextlib.contextmanager
def _forward_calls(model):
    """Counts forward calls of each block's image qkv projection and MLP: {part: [per block]}."""
    calls = {"attn": [0] * len(model.blocks), "mlp": [0] * len(model.blocks)}
    hooks = []
    for i, block in enumerate(model.blocks):
        for part, module in (("attn", block.x.attn.qkv), ("mlp", block.x.mlp)):

            def count(*_, part=part, i=i):
                calls[part][i] += 1

            hooks.append(module.register_forward_pre_hook(count))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize(
    "mode, every, recomputed",
    [
        # (mode, every k-th block, forward calls of block 0's attention and MLP per step)
        ("block", 1, {"attn": 2, "mlp": 2}),
        ("attention", 1, {"attn": 2, "mlp": 1}),
        ("mlp", 1, {"attn": 1, "mlp": 2}),
        ("block", 2, {"attn": 2, "mlp": 2}),
    ],
)
def test_activation_checkpointing_modes_same_outputs_and_grads(mode, every, recomputed):
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(1,))
    model = randomize(MMDiT(cfg))
    x, s, c, p = inputs(cfg)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    args = (x, s, c, p, mask)

    with _forward_calls(model) as calls:
        out_a, grads_a = _loss_and_grads(model, args)
    assert calls == {"attn": [1, 1, 1], "mlp": [1, 1, 1]}
    model.set_activation_checkpointing(mode, every)
    with _forward_calls(model) as calls:
        out_b, grads_b = _loss_and_grads(model, args)
    for part in ("attn", "mlp"):
        # Block 0 is always checkpointed; with every=2 block 1 is not, block 2 is again.
        assert calls[part][0] == recomputed[part], (part, calls)
        if every == 2:
            assert calls[part][1] == 1, (part, calls)

    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="'selective' is unknown"):
        model.set_activation_checkpointing("selective")


def test_selective_checkpointing_stores_less():
    """Bytes saved for the backward pass fall in the order none > mlp, attention > block."""
    cfg = tiny(depth=4, hidden_size=128, num_heads=2)
    model = randomize(MMDiT(cfg))
    args = inputs(cfg, h=16, w=16, text=16)
    saved = {}
    for mode in ("none", "mlp", "attention", "block"):
        model.set_activation_checkpointing(mode)
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*args).square().mean()
        saved[mode] = sum(storages.values())
    assert saved["none"] > saved["mlp"] > saved["block"], saved
    assert saved["none"] > saved["attention"] > saved["block"], saved


def test_last_block_skips_text_queries_and_all_else_gets_gradients():
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(0,))
    model = randomize(MMDiT(cfg))
    model.zero_grad(set_to_none=True)
    model(*inputs(cfg)).square().mean().backward()
    D = cfg.hidden_size
    # The last block computes no text queries: its text q-norm is unused and its q rows get
    # exact zeros; every other parameter gets a real gradient.
    assert model.blocks[2].context.attn.ln_q.weight.grad is None
    qkv_grad = model.blocks[2].context.attn.qkv.weight.grad
    assert torch.equal(qkv_grad[:D], torch.zeros_like(qkv_grad[:D]))
    assert qkv_grad[D:].abs().sum() > 0
    for name, p in model.named_parameters():
        if name != "blocks.2.context.attn.ln_q.weight":
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sigma_changes_output():
    cfg = tiny()
    model = randomize(MMDiT(cfg)).eval()
    x, s, c, p = inputs(cfg)
    with torch.no_grad():
        a = model(x, s, c, p)
        b = model(x, s + 0.01, c, p)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.gpu
def test_cuda_matches_cpu_and_bf16_is_close():
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(0,))
    model = randomize(MMDiT(cfg)).eval()
    args = inputs(cfg)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():
        ref = model(*args, context_mask=mask)
        model.cuda()
        cuda_args = [a.cuda() for a in args]
        out = model(*cuda_args, context_mask=mask.cuda()).cpu()
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16 = model(*cuda_args, context_mask=mask.cuda()).float().cpu()
    assert (out_bf16 - ref).abs().max() < 0.1 * ref.abs().max()


def test_initial_weights_do_not_depend_on_the_parameter_dtype():
    """DeepSpeed's zero.Init builds parameters in bf16: initialising them must give the fp32
    initialisation rounded to bf16, not other random numbers (ZeRO stages would then start
    from different weights)."""
    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(0,))
    fp32, bf16 = MMDiT(cfg, initialize=False), MMDiT(cfg, initialize=False).bfloat16()
    for model in (fp32, bf16):
        torch.manual_seed(3)
        model.initialize_weights()
    for (name, a), b in zip(fp32.named_parameters(), bf16.parameters(), strict=True):
        assert b.dtype == torch.bfloat16
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert fp32.blocks[0].x.attn.qkv.weight.abs().sum() > 0  # really drawn, not zeros
