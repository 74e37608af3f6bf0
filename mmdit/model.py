"""The SD3 MMDiT: a joint-attention diffusion transformer over image patches and text tokens.

One file (so one module of ~600 lines) in the spirit of facebookresearch/DiT: small modules,
an explicit initialize_weights(), no framework hooks. It computes the same function as
diffusers' SD3Transformer2DModel (see mmdit/convert.py for the weight mapping) with less work:
- one fused qkv projection per stream and one attention call over [image; text];
- SiLU of the conditioning vector once per forward, not once per adaLN linear;
- modulate and gated residuals as single addcmul ops;
- the last block computes no text queries (their outputs would be dropped);
- the patch embedding as one matmul over flattened patches instead of a convolution.

Internal modulation chunk orders follow Stability's reference implementation (sd3_impls.py):
(shift, scale, gate) x {attention, mlp[, attention 2]} for full blocks and (shift, scale) for the
last block's text stream and the final layer.

Every parameter is used inside its own module's forward, so ZeRO-3 can gather it per module or
per block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmdit.attention import BACKENDS, AttentionBackend, attention, check_backend

LN_EPS = 1e-6  # every LayerNorm and the QK RMSNorm in SD3 use 1e-6
TIMESTEP_CHANNELS = 256
# What a block recomputes in the backward pass instead of storing (activation checkpointing):
# nothing, the whole block, or only its attention or MLP sublayers (selective).
CHECKPOINT_MODES = ("none", "block", "attention", "mlp")

# Named shapes. d<N> follows the SD3 size rule (hidden 64·d, d heads); the sd3* names are the
# released shapes, for building a model that loads those checkpoints.
_PRESETS: dict[str, dict[str, Any]] = {
    **{f"d{d}": {"depth": d} for d in (2, 4, 8, 12, 15, 18, 21, 24, 30)},
    "d38": {"depth": 38, "qk_norm": "rms_norm"},
    "sd3-medium": {"depth": 24},
    "sd3.5-medium": {
        "depth": 24,
        "qk_norm": "rms_norm",
        "dual_attention_layers": tuple(range(13)),
        "pos_embed_max_size": 384,
    },
    "sd3.5-large": {"depth": 38, "qk_norm": "rms_norm"},
}


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int
    hidden_size: int | None = None  # None -> 64 * depth
    num_heads: int | None = None  # None -> depth
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192
    # Only enters the position-embedding formula (grid positions are scaled by
    # sample_size / patch_size / pos_embed_max_size, as in diffusers' PatchEmbed).
    sample_size: int = 128
    context_dim: int = 4096
    pooled_dim: int = 2048
    caption_projection_dim: int | None = None  # None -> hidden_size; must equal it
    mlp_ratio: float = 4.0
    qk_norm: Literal["none", "rms_norm"] = "none"
    dual_attention_layers: tuple[int, ...] = ()
    # How attention is computed (mmdit.attention): no weight depends on it, so readers of
    # saved weights may run them with another backend (see `same_weights_as`).
    attention_backend: AttentionBackend = "sdpa"

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def bad(field: str, msg: str) -> ValueError:
            return ValueError(f"MMDiTConfig.{field}: {msg}")

        if not isinstance(self.depth, int) or self.depth < 1:
            raise bad("depth", f"must be an int >= 1, got {self.depth!r}")
        if self.hidden_size is None:
            fix("hidden_size", 64 * self.depth)
        if self.num_heads is None:
            fix("num_heads", self.depth)
        if self.caption_projection_dim is None:
            fix("caption_projection_dim", self.hidden_size)
        fix("dual_attention_layers", tuple(sorted(set(self.dual_attention_layers))))

        for name in ("hidden_size", "num_heads", "patch_size", "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("pos_embed_max_size", "sample_size", "context_dim", "pooled_dim"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise bad(
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_heads={self.num_heads}; choose "
                f"hidden_size = num_heads * head_dim (SD3 uses head_dim 64)",
            )
        if self.hidden_size % 4:
            raise bad(
                "hidden_size",
                f"{self.hidden_size} must be a multiple of 4 for the 2-D sin-cos position "
                "embedding (a sin and a cos half per axis)",
            )
        if self.head_dim % 2:
            raise bad("num_heads", f"head_dim={self.head_dim} must be even; change num_heads")
        if self.caption_projection_dim != self.hidden_size:
            raise bad(
                "caption_projection_dim",
                f"{self.caption_projection_dim} != hidden_size={self.hidden_size}; the text "
                "stream must have the image stream's width (leave it None)",
            )
        if self.sample_size // self.patch_size < 1:
            raise bad("sample_size", f"must be >= patch_size={self.patch_size}")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise bad("mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        if self.qk_norm not in ("none", "rms_norm"):
            raise bad("qk_norm", f"must be 'none' or 'rms_norm', got {self.qk_norm!r}")
        if self.attention_backend not in BACKENDS:
            raise bad(
                "attention_backend", f"{self.attention_backend!r} is unknown; use one of {BACKENDS}"
            )
        bad_layers = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad_layers:
            raise bad(
                "dual_attention_layers",
                f"indices {bad_layers} are outside the blocks 0..{self.depth - 1}; "
                "drop them or increase depth",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_depth(cls, depth: int, **overrides: Any) -> MMDiTConfig:
        return cls(depth=depth, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MMDiTConfig:
        if name not in _PRESETS:
            raise ValueError(f"unknown MMDiT preset {name!r}; known: {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        return list(_PRESETS)

    def replace(self, **changes: Any) -> MMDiTConfig:
        return dataclasses.replace(self, **changes)

    def portable(self) -> MMDiTConfig:
        """The same model with the default attention backend, which runs on any device:
        what readers of saved weights build (a run trained with flash_attn on H100s is
        evaluated on a CPU too)."""
        return self.replace(attention_backend="sdpa")

    def same_weights_as(self, other: MMDiTConfig) -> bool:
        """True when both configs describe the same tensors (execution settings aside)."""
        return self.portable() == other.portable()


# --------------------------------------------------------------------------------------------
# Embedding helpers
# --------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """Sinusoid of t (B,) -> (B, dim), cos half first (diffusers' flip_sin_to_cos, shift 0)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000) / half)
    args = t.float()[:, None] * torch.exp(exponent)[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid_size: int, base_size: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos table (grid_size², dim), rows in raster order.

    First half of the channels encodes the column, second half the row; positions are
    arange(grid_size) * base_size / grid_size, all as in diffusers' get_2d_sincos_pos_embed.
    """
    pos = torch.arange(grid_size, dtype=torch.float32, device=device) / (grid_size / base_size)
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=device) / (dim / 4.0)
    omega = 1.0 / 10000**omega  # (D/4,)
    ang = pos.double()[:, None] * omega[None]  # (G, D/4)
    emb_1d = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)  # (G, D/2)
    cols = emb_1d[None, :, :].expand(grid_size, grid_size, -1)  # (row, col, D/2)
    rows = emb_1d[:, None, :].expand(grid_size, grid_size, -1)
    return torch.cat([cols, rows], dim=-1).reshape(grid_size * grid_size, dim).float()


@torch.no_grad()
def _draw(param: torch.Tensor, init_) -> None:
    """Initialise `param` with values drawn in fp32 on the CPU and then copied (rounded) in:
    the same numbers whatever the parameter's dtype and device, so a model built in bf16 on a
    GPU (DeepSpeed's zero.Init) starts from the weights an fp32 CPU build has."""
    value = torch.empty(param.shape, dtype=torch.float32)
    init_(value)
    param.copy_(value)


def modulate(x_norm: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # One fused op instead of mul, add, add; shift/scale are (B, 1, D).
    return torch.addcmul(shift, x_norm, 1 + scale)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> hidden: a stride-p convolution, computed as one matmul.

    The weight keeps the Conv2d layout (D, C, p, p) that both interop formats store; the
    matmul form is cheaper than a convolution call in forward and backward.
    """

    def __init__(self, in_channels: int, hidden: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(hidden, in_channels, patch_size, patch_size))
        self.bias = nn.Parameter(torch.empty(hidden))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        B, C, H, W = latents.shape
        p = self.patch_size
        patches = latents.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(B, (H // p) * (W // p), C * p * p)  # (B, h*w, C*p*p)
        return F.linear(patches, self.weight.flatten(1), self.bias)  # (B, h*w, D)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; embeds the timestep sinusoid and the pooled text vector."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TimestepEmbedder(MLPEmbedder):
    def __init__(self, hidden: int):
        super().__init__(TIMESTEP_CHANNELS, hidden)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        # SD3 was trained on t = 1000·σ, so the sinusoid frequencies expect that range; fp32
        # because bf16 would round t to a multiple of 4 near 1000.
        freq = timestep_embedding(sigma.float() * 1000, TIMESTEP_CHANNELS)  # (B, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


# --------------------------------------------------------------------------------------------
# Joint block
# --------------------------------------------------------------------------------------------


class QKVLinear(nn.Linear):
    """Fused q, k, v projection (rows in that order) that can skip the query rows."""

    def forward(self, x: torch.Tensor, kv_only: bool = False) -> torch.Tensor:
        if not kv_only:
            return super().forward(x)  # (B, N, 3D)
        # Slicing the weight (not the output) skips the query matmul; the query rows get an
        # all-zero gradient. Called as a module so ZeRO-3 gathers the weight as usual.
        D = self.out_features // 3
        return F.linear(x, self.weight[D:], self.bias[D:])  # (B, N, 2D)


class Attention(nn.Module):
    """One stream's attention projections; the joint kernel runs once over both streams."""

    def __init__(
        self, hidden: int, num_heads: int, qk_norm: str, backend: str, out_proj: bool = True
    ):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        head_dim = hidden // num_heads
        self.qkv = QKVLinear(hidden, 3 * hidden)
        # Per-head RMSNorm on q and k keeps attention logits bounded in bf16 at scale.
        self.ln_q = nn.RMSNorm(head_dim, eps=LN_EPS) if qk_norm == "rms_norm" else None
        self.ln_k = nn.RMSNorm(head_dim, eps=LN_EPS) if qk_norm == "rms_norm" else None
        # The last block's text stream feeds only keys/values to the image stream.
        self.proj = nn.Linear(hidden, hidden) if out_proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of this stream alone (SD3.5's second image attention)."""
        q, k, v = self.qkv_heads(x)
        return self.proj(attention(q, k, v, None, self.backend))  # (B, N, D)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).unbind(2)  # 3 x (B, N, H, Dh)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def kv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values only, for a stream whose attention outputs would be discarded.

        This stream's ln_q is then unused and gets no gradient.
        """
        B, N, _ = x.shape
        if isinstance(self.qkv, QKVLinear):
            kv = self.qkv(x, kv_only=True)
        else:  # wrapped (a LoRA adapter): the wrapper knows no kv_only; drop the query rows
            kv = self.qkv(x)[..., self.qkv.out_features // 3 :]
        k, v = kv.view(B, N, 2, self.num_heads, -1).unbind(2)
        if self.ln_k is not None:
            k = self.ln_k(k)
        return k, v  # 2 x (B, N, H, Dh)


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Stream(nn.Module):
    """The weights one stream (image or text) owns inside a joint block."""

    def __init__(self, config: MMDiTConfig, pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        D, H, norm = config.hidden_size, config.num_heads, config.qk_norm
        backend = config.attention_backend
        self.num_mod = 2 if pre_only else (9 if dual_attention else 6)
        self.modulation = nn.Linear(D, self.num_mod * D)
        self.attn = Attention(D, H, norm, backend, out_proj=not pre_only)
        self.attn2 = Attention(D, H, norm, backend) if dual_attention else None
        self.mlp = None if pre_only else Mlp(D, config.mlp_hidden)

    def mod(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.modulation(c)[:, None].chunk(self.num_mod, dim=-1)  # each (B, 1, D)


class JointBlock(nn.Module):
    """MMDiT block: per-stream adaLN-Zero, one attention over [image; text], per-stream MLP.

    context_pre_only (last block): the text stream only supplies keys/values and is dropped.
    dual_attention (SD3.5 MMDiT-X): a second, image-only self-attention from the same
    normalised input with its own modulation.

    `checkpoint_part` ("none", "attention" or "mlp"; MMDiT.set_activation_checkpointing sets
    it) names the sublayers whose activations are recomputed in the backward pass instead of
    stored: only their inputs are kept. "block" is applied around the whole block by MMDiT.
    """

    def __init__(
        self, config: MMDiTConfig, context_pre_only: bool = False, dual_attention: bool = False
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.dual_attention = dual_attention
        self.attention_backend = config.attention_backend
        self.checkpoint_part = "none"
        self.x = Stream(config, dual_attention=dual_attention)
        self.context = Stream(config, pre_only=context_pre_only)

    def _sublayer(self, part: str, fn, *args):
        if self.checkpoint_part == part and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(
        self,
        x: torch.Tensor,  # (B, Nx, D)
        ctx: torch.Tensor,  # (B, Nc, D)
        c: torch.Tensor,  # (B, D), already SiLU'd
        key_mask: torch.Tensor | None = None,  # (B, Nx + Nc) bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_mod = self.x.mod(c)
        c_mod = self.context.mod(c)

        x_norm = layer_norm(x)
        x_in = modulate(x_norm, x_mod[0], x_mod[1])
        ctx_in = modulate(layer_norm(ctx), c_mod[0], c_mod[1])
        x_att, c_att = self._sublayer("attention", self.joint_attention, x_in, ctx_in, key_mask)
        x = torch.addcmul(x, x_mod[2], x_att)
        if self.dual_attention:
            x_in2 = modulate(x_norm, x_mod[6], x_mod[7])
            x = torch.addcmul(x, x_mod[8], self._sublayer("attention", self.x.attn2, x_in2))
        mlp_in = modulate(layer_norm(x), x_mod[3], x_mod[4])
        x = torch.addcmul(x, x_mod[5], self._sublayer("mlp", self.x.mlp, mlp_in))

        if self.context_pre_only:
            return x, None
        ctx = torch.addcmul(ctx, c_mod[2], c_att)
        mlp_in = modulate(layer_norm(ctx), c_mod[3], c_mod[4])
        ctx = torch.addcmul(ctx, c_mod[5], self._sublayer("mlp", self.context.mlp, mlp_in))
        return x, ctx

    def joint_attention(
        self, x_in: torch.Tensor, ctx_in: torch.Tensor, key_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both streams' projections around one attention over [image; text] -> the projected
        outputs (B, Nx, D) and (B, Nc, D) (None for the text of a context_pre_only block)."""
        Nx = x_in.shape[1]
        xq, xk, xv = self.x.attn.qkv_heads(x_in)
        if self.context_pre_only:
            # Text queries would only produce outputs that this block drops: image tokens
            # attend to the joint sequence, text tokens only supply keys and values.
            ck, cv = self.context.attn.kv_heads(ctx_in)
            q = xq
        else:
            cq, ck, cv = self.context.attn.qkv_heads(ctx_in)
            q = torch.cat([xq, cq], dim=1)
        k, v = torch.cat([xk, ck], dim=1), torch.cat([xv, cv], dim=1)
        out = attention(q, k, v, key_mask, self.attention_backend)  # (B, Nq, D)
        if self.context_pre_only:
            return self.x.attn.proj(out), None
        # split (not two slices): its backward is one cat instead of two zero-filled buffers.
        x_out, c_out = out.split([Nx, out.shape[1] - Nx], dim=1)
        return self.x.attn.proj(x_out), self.context.attn.proj(c_out)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.modulation = nn.Linear(hidden, 2 * hidden)  # (shift, scale)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(layer_norm(x), shift, scale))  # (B, N, p*p*C)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """SD3 MMDiT predicting the rectified-flow velocity v = ε - x0.

    forward(latents (B, C, H, W), sigma (B,), context (B, L, context_dim),
            pooled (B, pooled_dim), context_mask (B, L) bool or None) -> (B, out_channels, H, W)
    """

    def __init__(self, config: MMDiTConfig, initialize: bool = True):
        """`initialize=False` leaves torch's default init for the caller to replace with
        `initialize_weights` (e.g. part by part while parameters are sharded)."""
        super().__init__()
        check_backend(config.attention_backend)
        self.config = config
        D, p = config.hidden_size, config.patch_size

        self.x_embedder = PatchEmbed(config.in_channels, D, p)
        # Fixed, but a persistent buffer: both reference formats store it, and loading a
        # checkpoint's table keeps a model exact even if it was not built from this formula.
        self.register_buffer("pos_embed", self._pos_embed_table(), persistent=True)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = MLPEmbedder(config.pooled_dim, D)
        self.context_embedder = nn.Linear(config.context_dim, D)
        self.blocks = nn.ModuleList(
            JointBlock(
                config,
                context_pre_only=i == config.depth - 1,
                dual_attention=i in config.dual_attention_layers,
            )
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(D, p, config.out_channels)
        if initialize:
            self.initialize_weights()

    def _pos_embed_table(self) -> torch.Tensor:
        cfg = self.config
        table = sincos_pos_embed_2d(
            cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size
        )
        return table[None]  # (1, P², D)

    def weight_init_parts(self) -> list[nn.Module]:
        """The top-level modules `initialize_weights` handles one at a time (a trainer that
        shards parameters gathers one part at a time to initialise it)."""
        return [
            self.x_embedder,
            self.t_embedder,
            self.y_embedder,
            self.context_embedder,
            *self.blocks,
            self.final_layer,
        ]

    def initialize_weights(self, parts: list[nn.Module] | None = None) -> None:
        """DiT/SD3 init: xavier linears, zero biases, zero adaLN and output -> output is 0."""
        for part in self.weight_init_parts() if parts is None else parts:
            self._initialize_part(part)
        # Recompute, so a model materialised from the meta device gets the table too.
        with torch.no_grad():
            self.pos_embed.copy_(self._pos_embed_table().to(self.pos_embed.device))

    def _initialize_part(self, part: nn.Module) -> None:
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                _draw(module.weight, nn.init.xavier_uniform_)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

        if part is self.x_embedder:
            # The patch embedding is a linear map of flattened patches; init it like one.
            w = part.weight
            _draw(w, lambda t: nn.init.xavier_uniform_(t.view(t.shape[0], -1)))
            nn.init.zeros_(part.bias)
            return
        part.apply(basic_init)
        if part is self.t_embedder or part is self.y_embedder:
            _draw(part.mlp[0].weight, lambda t: nn.init.normal_(t, std=0.02))
            _draw(part.mlp[2].weight, lambda t: nn.init.normal_(t, std=0.02))
        elif isinstance(part, JointBlock):
            # adaLN-Zero: every block starts as the identity...
            for stream in (part.x, part.context):
                nn.init.zeros_(stream.modulation.weight)
                nn.init.zeros_(stream.modulation.bias)
        elif part is self.final_layer:
            # ...and the output as zero.
            for layer in (part.modulation, part.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def set_activation_checkpointing(self, mode: str = "block", every: int = 1) -> None:
        """Recompute activations in the backward pass instead of storing them, in every
        `every`-th block (0, every, 2 every, ...): the whole block ("block"), only its
        attention or MLP sublayers ("attention", "mlp"), or nothing ("none")."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(
                f"activation checkpointing {mode!r} is unknown; use one of {CHECKPOINT_MODES}"
            )
        if every < 1:
            raise ValueError(f"activation checkpointing every {every} blocks: must be >= 1")
        for i, block in enumerate(self.blocks):
            block.checkpoint_part = mode if i % every == 0 else "none"

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Centre crop of the P×P table for an h×w patch grid -> (1, h*w, D)."""
        P = self.config.pos_embed_max_size
        top, left = (P - h) // 2, (P - w) // 2
        table = self.pos_embed.view(1, P, P, -1)
        return table[:, top : top + h, left : left + w].reshape(1, h * w, -1)

    def _check_inputs(self, latents, sigma, context, pooled, context_mask) -> None:
        cfg = self.config
        p, P = cfg.patch_size, cfg.pos_embed_max_size
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(
                f"latents must be (B, {cfg.in_channels}, H, W), got {tuple(latents.shape)}"
            )
        B, _, H, W = latents.shape
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by patch_size={p}")
        if H // p > P or W // p > P:
            raise ValueError(
                f"latent size {H}x{W} is {H // p}x{W // p} patches, more than the position "
                f"grid pos_embed_max_size={P} allows (max latent side {P * p})"
            )
        if sigma.shape != (B,):
            raise ValueError(f"sigma must be ({B},), got {tuple(sigma.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(
                f"context must be ({B}, L, {cfg.context_dim}), got {tuple(context.shape)}"
            )
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"pooled must be ({B}, {cfg.pooled_dim}), got {tuple(pooled.shape)}")
        if context_mask is not None and (
            context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} "
                f"(True = real token), got {context_mask.dtype} {tuple(context_mask.shape)}"
            )

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_inputs(latents, sigma, context, pooled, context_mask)
        B, _, H, W = latents.shape
        p = self.config.patch_size
        h, w = H // p, W // p

        x = self.x_embedder(latents)  # (B, h*w, D) in the weights' dtype
        # The table is an fp32 buffer (DeepSpeed casts parameters, not buffers): adding it
        # as is would promote bf16 activations to fp32 ahead of every bf16 weight.
        x = x + self.cropped_pos_embed(h, w).to(x.dtype)
        # Every consumer of c (all adaLN linears, the final layer) starts with a SiLU.
        c = F.silu(self.t_embedder(sigma) + self.y_embedder(pooled))  # (B, D)
        ctx = self.context_embedder(context)  # (B, L, D)

        key_mask = None
        if context_mask is not None:
            image_keys = context_mask.new_ones(B, h * w)
            key_mask = torch.cat([image_keys, context_mask], dim=1)  # (B, h*w + L)

        for block in self.blocks:
            if block.checkpoint_part == "block" and torch.is_grad_enabled():
                x, ctx = checkpoint(block, x, ctx, c, key_mask, use_reentrant=False)
            else:
                x, ctx = block(x, ctx, c, key_mask)

        x = self.final_layer(x, c)  # (B, h*w, p*p*C)
        return self.unpatchify(x, h, w)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) with channels ordered (p, q, c) -> (B, C, h*p, w*p)."""
        p, C = self.config.patch_size, self.config.out_channels
        x = x.view(x.shape[0], h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)
        return x.reshape(x.shape[0], C, h * p, w * p)
