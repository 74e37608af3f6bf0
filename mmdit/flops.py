"""Parameter and FLOP accounting for MMDiT, from the config alone (no model is built).

Two levels of detail:

* ``matmul_flops_per_sample``: every matrix product of one sample's forward pass counted as
  2*m*n*k, by component. Training adds the backward pass: 2x the forward for the gradients
  w.r.t. weights and inputs, except the first layers whose inputs (latents, text embeddings,
  the sinusoid) need no gradient, which only pay for the weight gradient. This is what
  ``torch.utils.flop_counter.FlopCounterMode`` reports for the real model when attention runs
  through the math SDPA backend (its fused-kernel formulas add a recomputation of QK^T in the
  backward that an MFU figure should not count, and the CPU fused kernel is not counted at all).
* ``approx_train_flops_per_sample``: DESIGN.md's closed form, 6 P_stream N + 12 D h N^2 with
  P_stream = 12 h^2 D: the per-token weights of one stream plus attention, nothing else.
  ``train_flops_per_sample`` applies it to a square training sample (``sample_tokens``): the
  one count behind the trainer's MFU, the eval table's train_flops and the scaling ladder.

Norms, activations, softmax and modulation arithmetic are elementwise and not counted; they
are well under 1% of the matmul work at any real size.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdit.conditioning.text import CLIP_LENGTH
from mmdit.conditioning.vae import SPATIAL_FACTOR

if TYPE_CHECKING:
    from mmdit.model import MMDiTConfig

TIMESTEP_DIM = 256  # width of the sinusoidal timestep features fed to the timestep MLP

# Dense bf16 tensor-core peak, FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
}


def device_name(device) -> str:
    """What a device is, for peak look-ups and benchmark records: the CUDA device's name, or
    the CPU model from /proc/cpuinfo."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak for a ``torch.cuda.get_device_name()`` string, or None for an unknown device."""
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_FLOPS["H200"]
    if "H100" in name:
        return PEAK_BF16_FLOPS["H100 PCIe" if "PCIE" in name else "H100 SXM"]
    if "A100" in name:
        return PEAK_BF16_FLOPS["A100"]
    return None


def mfu(flops_per_sec: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of the hardware peak."""
    return flops_per_sec / peak_flops


def _dims(config: Any) -> dict[str, int]:
    h = config.hidden_size
    return {
        "h": h,
        "depth": config.depth,
        "head_dim": h // config.num_heads,
        "mlp": int(h * config.mlp_ratio),
        "p2": config.patch_size**2,
        "cap": getattr(config, "caption_projection_dim", None) or h,
        "qk": 2 * (h // config.num_heads) if config.qk_norm == "rms_norm" else 0,
    }


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out  # weight + bias (every linear in MMDiT has a bias)


def param_counts(config: Any) -> dict[str, int]:
    """Trainable parameters per part of the model, by formula.

    Keys: ``embedders`` (patch embed, timestep and pooled MLPs, context embedder),
    ``image_blocks`` / ``text_blocks`` (everything in the joint blocks belonging to the image /
    text stream, modulation included), ``final_layer`` (adaLN + linear), ``total``. The fixed
    sin-cos position table is a buffer and is not counted.
    """
    d = _dims(config)
    h = d["h"]
    embedders = (
        _linear(config.in_channels * d["p2"], h)  # patch embed (a p x p stride-p conv)
        + _linear(TIMESTEP_DIM, h)
        + _linear(h, h)
        + _linear(config.pooled_dim, h)
        + _linear(h, h)
        + _linear(config.context_dim, d["cap"])
    )
    blocks = [block_param_counts(config, i) for i in range(config.depth)]
    image = sum(b[0] for b in blocks)
    text = sum(b[1] for b in blocks)
    final = _linear(h, 2 * h) + _linear(h, d["p2"] * config.out_channels)
    return {
        "embedders": embedders,
        "image_blocks": image,
        "text_blocks": text,
        "final_layer": final,
        "total": embedders + image + text + final,
    }


def block_param_counts(config: Any, index: int) -> tuple[int, int]:
    """(image stream, text stream) parameters of joint block `index`."""
    d = _dims(config)
    h, m, qk = d["h"], d["mlp"], d["qk"]
    attn = 4 * _linear(h, h) + qk  # q, k, v, out (+ per-head RMSNorm weights for q and k)
    mlp = _linear(h, m) + _linear(m, h)
    is_dual = index in set(config.dual_attention_layers)
    # adaLN-Zero: shift/scale/gate for attention and MLP (6); dual adds 3 for attn2.
    image = _linear(h, (9 if is_dual else 6) * h) + attn + mlp + (attn if is_dual else 0)
    if index == config.depth - 1:
        # context_pre_only: text only supplies k, v (and q) to the joint attention.
        text = _linear(h, 2 * h) + 3 * _linear(h, h) + qk
    else:
        text = _linear(h, 6 * h) + attn + mlp
    return image, text


def largest_block_params(config: Any) -> int:
    """Parameters of the largest joint block: ZeRO-3's unit of gathering and prefetching."""
    return max(sum(block_param_counts(config, i)) for i in range(config.depth))


def matmul_flops_breakdown(
    config: Any, height: int, width: int, text_len: int, training: bool = False
) -> dict[str, int]:
    """Matmul FLOPs of one sample by component; see ``matmul_flops_per_sample``."""
    d = _dims(config)
    h, m, p2 = d["h"], d["mlp"], d["p2"]
    n = (height // config.patch_size) * (width // config.patch_size)  # image tokens
    L = text_len
    t = n + L  # joint sequence
    dual = set(config.dual_attention_layers)

    # Layers fed by inputs that need no gradient: backward is only the weight gradient.
    input_layers = 2 * (
        n * config.in_channels * p2 * h  # patch embed
        + TIMESTEP_DIM * h  # first timestep-MLP linear (sinusoid input)
        + config.pooled_dim * h  # first pooled-MLP linear
        + L * config.context_dim * d["cap"]  # context embedder
    )
    out = {
        "input_layers": input_layers,
        "cond_mlps": 2 * 2 * h * h,  # second linear of the timestep and pooled MLPs
        "modulation": 0,
        "qkv": 0,
        "attention": 0,
        "attn_out": 0,
        "mlp": 0,
        "dual_attention": 0,
        "final_layer": 2 * h * 2 * h + 2 * n * h * p2 * config.out_channels,
    }
    for i in range(config.depth):
        last = i == config.depth - 1
        out["modulation"] += 2 * h * h * ((9 if i in dual else 6) + (2 if last else 6))
        if last:
            # context_pre_only: the text outputs would be dropped, so mmdit.model computes no
            # text queries; only the image tokens attend (diffusers still computes all of it).
            out["qkv"] += 2 * n * h * 3 * h + 2 * L * h * 2 * h
            out["attention"] += 2 * 2 * n * t * h
        else:
            out["qkv"] += 2 * t * h * 3 * h  # q, k, v of both streams
            out["attention"] += 2 * 2 * t * t * h  # QK^T and AV over the joint sequence
        out["attn_out"] += 2 * (n if last else t) * h * h
        out["mlp"] += 2 * (n if last else t) * 2 * h * m
        if i in dual:
            # Image-only second attention: q, k, v, out projections and its own QK^T, AV.
            out["dual_attention"] += 2 * n * h * 4 * h + 2 * 2 * n * n * h
    if training:
        out = {k: v * (2 if k == "input_layers" else 3) for k, v in out.items()}
    return out


def matmul_flops_per_sample(
    config: Any, height: int, width: int, text_len: int, training: bool = False
) -> int:
    """Exact matmul FLOPs (2*m*n*k each) of one sample.

    ``height`` and ``width`` are the *latent* sizes the model sees (pixels / 8 for the SD3
    VAE), ``text_len`` the number of context tokens (154 for CLIP 77 + T5 77). With
    ``training`` the backward pass is included (about 3x the forward).
    """
    return sum(matmul_flops_breakdown(config, height, width, text_len, training).values())


def approx_train_flops_per_sample(config: MMDiTConfig, image_tokens: int, text_tokens: int) -> int:
    """DESIGN.md's estimate: 6 P_stream N + 12 D h N^2, P_stream = 12 h^2 D, N = all tokens.

    Every token passes through one stream's weights (12 h^2 per block: qkv 3, out 1, MLP 8),
    6 FLOPs per weight and token for forward + backward; attention is 4 N^2 h per block
    forward, 12 with the backward. Ignores embedders, modulation, the final layer, the last
    block's missing text path and dual attention.
    """
    h, depth = config.hidden_size, config.depth
    n = image_tokens + text_tokens
    p_stream = 12 * h * h * depth
    return 6 * p_stream * n + 12 * depth * h * n * n


def sample_tokens(config: MMDiTConfig, resolution: int, t5_max_length: int) -> tuple[int, int]:
    """(image tokens, text tokens) of one square training sample of ``resolution`` pixels.

    The same counts the trainer's tokens/s and TFLOP/s use: latents are resolution / 8 on a
    side, cut into patch x patch tokens; the context is CLIP's 77 tokens (CLIP-L and bigG are
    concatenated along channels) followed by ``t5_max_length`` T5 tokens, which are zeros but
    still attended to when the run does not use T5.
    """
    side = resolution // SPATIAL_FACTOR // config.patch_size
    return side * side, CLIP_LENGTH + t5_max_length


def train_flops_per_sample(config: MMDiTConfig, resolution: int, t5_max_length: int) -> int:
    """Training FLOPs (forward + backward) of one square sample, as the trainer's MFU counts
    them: ``approx_train_flops_per_sample`` at ``sample_tokens``."""
    return approx_train_flops_per_sample(config, *sample_tokens(config, resolution, t5_max_length))
