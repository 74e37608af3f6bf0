"""FLOPs and parameter formulas against the real model and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmdit import flops
from mmdit.model import MMDiT, MMDiTConfig
from tests.mmdit.tiny_mmdit import tiny

# Tiny shapes: (depth, heads, head_dim, dual layers, qk_norm, latent H, latent W, text tokens).
CASES = [
    (3, 2, 16, (), "none", 8, 8, 6),
    (3, 2, 16, (0, 1), "rms_norm", 8, 12, 7),  # dual attention, non-square
    (4, 4, 8, (1,), "rms_norm", 12, 6, 3),
    (1, 2, 16, (0,), "none", 4, 4, 5),  # the only block is both dual and context_pre_only
]


def _config(depth, heads, head_dim, dual, qk_norm, H, W, L) -> MMDiTConfig:
    return MMDiTConfig.from_depth(
        depth,
        hidden_size=heads * head_dim,
        num_heads=heads,
        context_dim=48,
        pooled_dim=24,
        sample_size=max(H, W),
        pos_embed_max_size=max(H, W),
        qk_norm=qk_norm,
        dual_attention_layers=dual,
    )


def _case_id(case):
    return "d{}-h{}x{}-dual{}-{}-{}x{}-L{}".format(*case[:3], len(case[3]), *case[4:])


def _counted(model, cfg, B, H, W, L, training):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    sigma = torch.rand(B, generator=g)
    ctx = torch.randn(B, L, cfg.context_dim, generator=g)
    pooled = torch.randn(B, cfg.pooled_dim, generator=g)
    # The math backend decomposes attention into bmm's that the counter sees, with a backward
    # of exactly 2x (the fused kernels' formulas count a recomputation, and the CPU fused
    # kernel is not counted at all).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, sigma, ctx, pooled)
        if training:
            out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("training", [False, True], ids=["forward", "train"])
def test_matmul_flops_match_flop_counter(case, training):
    cfg = _config(*case)
    H, W, L = case[5:]
    model = MMDiT(cfg)
    B = 2
    counted = _counted(model, cfg, B, H, W, L, training)
    predicted = B * flops.matmul_flops_per_sample(cfg, H, W, L, training=training)
    assert counted > 0
    assert predicted == pytest.approx(counted, rel=0.02)  # the requirement
    # The formula mirrors mmdit.model matmul for matmul, so it is exact; a mismatch means the
    # model changed and flops.py must follow.
    assert predicted == counted


def test_training_is_about_three_forwards():
    cfg = MMDiTConfig.preset("d24")
    fwd = flops.matmul_flops_per_sample(cfg, 64, 64, 154)
    train = flops.matmul_flops_per_sample(cfg, 64, 64, 154, training=True)
    assert 2.9 * fwd < train < 3 * fwd  # only the input layers skip the input gradient


def test_breakdown_sums_and_scales_with_tokens():
    cfg = MMDiTConfig.preset("d24", dual_attention_layers=(0, 1))
    parts = flops.matmul_flops_breakdown(cfg, 64, 64, 154)
    assert sum(parts.values()) == flops.matmul_flops_per_sample(cfg, 64, 64, 154)
    assert parts["dual_attention"] > 0 and parts["attention"] > 0
    # Two dual layers of image-only attention at N=1024 tokens: 4 projections + QK^T + AV.
    h, n = 1536, 1024
    assert parts["dual_attention"] == 2 * (2 * n * h * 4 * h + 4 * n * n * h)
    # Doubling the image side quadruples the tokens: linear parts x4, image attention x16.
    bigger = flops.matmul_flops_breakdown(cfg, 128, 128, 154)
    assert bigger["dual_attention"] == 2 * (2 * 4 * n * h * 4 * h + 4 * 16 * n * n * h)
    assert 3.5 * parts["mlp"] < bigger["mlp"] < 4 * parts["mlp"]


def _stream_of(name: str) -> str:
    if name.startswith(("x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.")):
        return "embedders"
    if name.startswith("final_layer."):
        return "final_layer"
    if name.startswith("blocks."):
        stream = name.split(".")[2]
        return {"x": "image_blocks", "context": "text_blocks"}[stream]
    raise AssertionError(f"unclassified parameter {name}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_param_counts_match_model(case):
    cfg = _config(*case)
    model = MMDiT(cfg)
    actual = dict.fromkeys(("embedders", "image_blocks", "text_blocks", "final_layer"), 0)
    for name, p in model.named_parameters():
        actual[_stream_of(name)] += p.numel()
    actual["total"] = sum(p.numel() for p in model.parameters())
    assert flops.param_counts(cfg) == actual


def test_param_counts_sd3_medium():
    # SD3-medium's published size: 2.03B parameters (d=24, hidden 1536).
    total = flops.param_counts(MMDiTConfig.preset("d24"))["total"]
    assert 2.0e9 < total < 2.1e9


def test_approx_formula_close_to_exact_at_d24_512px():
    cfg = MMDiTConfig.preset("d24")
    image_tokens, text_tokens = 32 * 32, 154  # 512 px -> 64x64 latent -> 32x32 patches
    exact = flops.matmul_flops_per_sample(cfg, 64, 64, text_tokens, training=True)
    approx = flops.approx_train_flops_per_sample(cfg, image_tokens, text_tokens)
    # The closed form drops the embedders, modulation and final layer (a few %) and still
    # counts the last block's text path; the two nearly cancel (0.3% here), so 2% is loose.
    assert approx == pytest.approx(exact, rel=0.02)
    # Known value: h=1536, D=24, N=1178.
    h, depth, n = 1536, 24, 1178
    assert approx == 6 * 12 * h * h * depth * n + 12 * depth * h * n * n


def test_mfu_and_peaks():
    assert flops.mfu(494.5e12, 989e12) == pytest.approx(0.5)
    assert flops.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_bf16_flops("NVIDIA H200") == 989e12
    assert flops.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_bf16_flops("NVIDIA GeForce RTX 3090") is None


def test_block_param_counts_match_each_block_of_the_model():
    from mmdit.flops import block_param_counts, largest_block_params

    cfg = tiny(qk_norm="rms_norm", dual_attention_layers=(1,))
    model = MMDiT(cfg)
    counted = []
    for i, block in enumerate(model.blocks):
        image = sum(p.numel() for p in block.x.parameters())
        text = sum(p.numel() for p in block.context.parameters())
        assert block_param_counts(cfg, i) == (image, text), i
        counted.append(image + text)
    assert largest_block_params(cfg) == max(counted) == counted[1]  # the dual-attention one


def test_sample_tokens_match_the_trainers_count():
    """256 px -> 32x32 latents -> 16x16 patches; CLIP's 77 tokens then the T5 tokens (zeros,
    still attended to, when a run does not use T5)."""
    cfg = MMDiTConfig.preset("d24")
    assert flops.sample_tokens(cfg, 256, 77) == (16 * 16, 77 + 77)
    assert flops.train_flops_per_sample(cfg, 256, 77) == (
        flops.approx_train_flops_per_sample(cfg, 256, 154)
    )
