"""Tiny MMDiT configs, randomised weights and inputs shared by the model-level tests."""

from __future__ import annotations

import torch

from mmdit import MMDiTConfig


def tiny(**overrides) -> MMDiTConfig:
    """Depth 3 by default so the last (context_pre_only) block differs from the others."""
    kw = dict(
        hidden_size=64,
        num_heads=2,
        pos_embed_max_size=16,
        sample_size=16,
        context_dim=48,
        pooled_dim=24,
    )
    kw.update(overrides)
    return MMDiTConfig.from_depth(kw.pop("depth", 3), **kw)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (a fresh MMDiT is the zero function), outputs of O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if "norm" in name.rsplit(".", 2)[-2] or name.endswith(("ln_q.weight", "ln_k.weight")):
                p.add_(1.0)  # RMSNorm gains around 1
    return model


def inputs(cfg: MMDiTConfig, batch=2, h=8, w=12, text=7, seed=1):
    """(latents, sigma, context, pooled); non-square by default to catch transposed grids."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, cfg.in_channels, h, w, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, text, cfg.context_dim, generator=g),
        torch.randn(batch, cfg.pooled_dim, generator=g),
    )


def tiny_diffusers_transformer(num_layers: int = 1):
    """A tiny diffusers SD3Transformer2DModel with SD3's conditioning widths (4096 / 2048), for
    loading StableDiffusion3Pipeline from a tiny component directory."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=4096,
        caption_projection_dim=16,
        pooled_projection_dim=2048,
        pos_embed_max_size=16,
    )
