"""Weight conversion between our MMDiT and the formats people already use.

One module: the key maps of the three layouts (ours, diffusers, single-file) are read side
by side, rule by rule.

- diffusers ``SD3Transformer2DModel`` (``config.json`` + ``diffusion_pytorch_model*.safetensors``)
- Stability's single-file layout (``model.diffusion_model.joint_blocks.N...`` as in sd3_impls.py)

Every conversion is a table of rules built from the config (one rule per tensor group), so the
expected key set and shapes are known up front and bad inputs fail with the offending keys
named. Nothing here imports diffusers; parity with it is proven numerically in the tests.

Layout differences handled here:
- our per-stream qkv projection is one (3D, D) linear; diffusers has separate q/k/v linears;
- our (shift, scale) order for the final layer and the last block's text stream is diffusers'
  (scale, shift) order (AdaLayerNormContinuous);
- the single-file format has our layout already, only the names differ.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdit.model import MMDiT, MMDiTConfig

StateDict = dict[str, torch.Tensor]

SINGLE_FILE_PREFIX = "model.diffusion_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_CONFIG = "config.json"

# SD3Transformer2DModel.__init__ defaults, for configs that leave keys out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}


# --------------------------------------------------------------------------------------------
# Rule tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """Our tensor `ours` <-> the other format's tensors `theirs`.

    kind "copy": one-to-one; "split": ours is the concatenation of theirs along dim 0 (fused
    qkv); "swap": ours is (shift, scale), theirs is (scale, shift).
    """

    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"


def _linear(ours: str, theirs: str, kind: str = "copy") -> list[_Rule]:
    return [_Rule(f"{ours}.{p}", (f"{theirs}.{p}",), kind) for p in ("weight", "bias")]


def _qkv(ours: str, theirs: Iterable[str]) -> list[_Rule]:
    names = tuple(theirs)
    return [
        _Rule(f"{ours}.{p}", tuple(f"{n}.{p}" for n in names), "split") for p in ("weight", "bias")
    ]


def _diffusers_rules(config: MMDiTConfig) -> list[_Rule]:
    rules = [
        _Rule("pos_embed", ("pos_embed.pos_embed",)),
        *_linear("x_embedder", "pos_embed.proj"),
        *_linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        *_linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        *_linear("context_embedder", "context_embedder"),
    ]
    qk = config.qk_norm == "rms_norm"
    for i in range(config.depth):
        o, t = f"blocks.{i}", f"transformer_blocks.{i}"
        last = i == config.depth - 1
        rules += _linear(f"{o}.x.modulation", f"{t}.norm1.linear")
        rules += _qkv(f"{o}.x.attn.qkv", (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"))
        rules += _linear(f"{o}.x.attn.proj", f"{t}.attn.to_out.0")
        rules += _linear(f"{o}.x.mlp.fc1", f"{t}.ff.net.0.proj")
        rules += _linear(f"{o}.x.mlp.fc2", f"{t}.ff.net.2")
        ctx_names = (f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")
        rules += _qkv(f"{o}.context.attn.qkv", ctx_names)
        # The last block's text stream has AdaLayerNormContinuous there: (scale, shift).
        swap = "swap" if last else "copy"
        rules += _linear(f"{o}.context.modulation", f"{t}.norm1_context.linear", swap)
        if not last:
            rules += _linear(f"{o}.context.attn.proj", f"{t}.attn.to_add_out")
            rules += _linear(f"{o}.context.mlp.fc1", f"{t}.ff_context.net.0.proj")
            rules += _linear(f"{o}.context.mlp.fc2", f"{t}.ff_context.net.2")
        if qk:
            rules += [
                _Rule(f"{o}.x.attn.ln_q.weight", (f"{t}.attn.norm_q.weight",)),
                _Rule(f"{o}.x.attn.ln_k.weight", (f"{t}.attn.norm_k.weight",)),
                _Rule(f"{o}.context.attn.ln_q.weight", (f"{t}.attn.norm_added_q.weight",)),
                _Rule(f"{o}.context.attn.ln_k.weight", (f"{t}.attn.norm_added_k.weight",)),
            ]
        if i in config.dual_attention_layers:
            rules += _qkv(
                f"{o}.x.attn2.qkv", (f"{t}.attn2.to_q", f"{t}.attn2.to_k", f"{t}.attn2.to_v")
            )
            rules += _linear(f"{o}.x.attn2.proj", f"{t}.attn2.to_out.0")
            if qk:
                rules += [
                    _Rule(f"{o}.x.attn2.ln_q.weight", (f"{t}.attn2.norm_q.weight",)),
                    _Rule(f"{o}.x.attn2.ln_k.weight", (f"{t}.attn2.norm_k.weight",)),
                ]
    rules += _linear("final_layer.modulation", "norm_out.linear", "swap")
    rules += _linear("final_layer.linear", "proj_out")
    return rules


def _single_file_name(ours: str) -> str:
    parts = ours.split(".")
    if parts[0] == "x_embedder":
        parts.insert(1, "proj")  # a Conv2d inside a PatchEmbed there
    elif parts[0] == "blocks":
        parts[0] = "joint_blocks"
        parts[2] = {"x": "x_block", "context": "context_block"}[parts[2]]
    if "modulation" in parts:  # nn.Sequential(SiLU, Linear) there; we apply SiLU once
        i = parts.index("modulation")
        parts[i : i + 1] = ["adaLN_modulation", "1"]
    return SINGLE_FILE_PREFIX + ".".join(parts)


def _single_file_rules(config: MMDiTConfig) -> list[_Rule]:
    """Pure renames: the reference implementation has our fused layouts and chunk orders."""
    return [_Rule(name, (_single_file_name(name),)) for name in _expected_shapes(config)]


# --------------------------------------------------------------------------------------------
# Generic machinery
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: MMDiTConfig) -> dict[str, torch.Size]:
    """Our state dict's names and shapes, read off a model built on the meta device."""
    with torch.device("meta"):
        model = MMDiT(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _their_shapes(rules: list[_Rule], ours: Mapping[str, torch.Size]) -> dict[str, torch.Size]:
    shapes = {}
    for r in rules:
        s = ours[r.ours]
        for name in r.theirs:
            shapes[name] = torch.Size((s[0] // len(r.theirs), *s[1:]))
    return shapes


def check_state_dict(
    state_dict: Mapping[str, Any], expected: Mapping[str, torch.Size], what: str
) -> None:
    """Raise one ValueError naming missing, unexpected and mis-shaped keys (first few each)."""

    def few(keys: list[str]) -> str:
        keys = sorted(keys)
        more = f" ... (+{len(keys) - 5} more)" if len(keys) > 5 else ""
        return ", ".join(keys[:5]) + more

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = {k: tuple(getattr(state_dict[k], "shape", ("not a tensor",))) for k in state_dict}
    wrong = [
        f"{k}: {shapes[k]} != {tuple(expected[k])}"
        for k in expected
        if k in shapes and shapes[k] != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys [{few(missing)}]")
    if unexpected:
        problems.append(f"unexpected keys [{few(unexpected)}]")
    if wrong:
        problems.append(f"wrong shapes [{few(wrong)}]")
    if problems:
        raise ValueError(f"state dict is not a valid {what}: " + "; ".join(problems))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _apply_forward(rules: list[_Rule], sd: Mapping[str, torch.Tensor]) -> StateDict:
    out: StateDict = {}
    for r in rules:
        t = sd[r.ours]
        if r.kind == "split":
            out.update(
                zip(r.theirs, (c.clone() for c in t.chunk(len(r.theirs), dim=0)), strict=True)
            )
        elif r.kind == "swap":
            out[r.theirs[0]] = _swap_halves(t)
        else:
            out[r.theirs[0]] = t
    return out


def _apply_backward(rules: list[_Rule], sd: Mapping[str, torch.Tensor]) -> StateDict:
    out: StateDict = {}
    for r in rules:
        if r.kind == "split":
            out[r.ours] = torch.cat([sd[n] for n in r.theirs], dim=0)
        elif r.kind == "swap":
            out[r.ours] = _swap_halves(sd[r.theirs[0]])
        else:
            out[r.ours] = sd[r.theirs[0]]
    return out


def _ours_checked(state_dict: Mapping[str, torch.Tensor], config: MMDiTConfig) -> None:
    check_state_dict(state_dict, _expected_shapes(config), f"MMDiT state dict for {config}")


# --------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------


def diffusers_config(config: MMDiTConfig) -> dict[str, Any]:
    """SD3Transformer2DModel(**diffusers_config(config)) has our architecture."""
    if config.mlp_ratio != 4.0:
        raise ValueError(
            f"diffusers' SD3Transformer2DModel has a fixed MLP ratio of 4; this model has "
            f"mlp_ratio={config.mlp_ratio} and cannot be exported"
        )
    return {
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "caption_projection_dim": config.caption_projection_dim,
        "pooled_projection_dim": config.pooled_dim,
        "out_channels": config.out_channels,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": list(config.dual_attention_layers),
        "qk_norm": None if config.qk_norm == "none" else config.qk_norm,
    }


def config_from_diffusers(diffusers_cfg: Mapping[str, Any]) -> MMDiTConfig:
    unknown = sorted(
        k for k in diffusers_cfg if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS
    )
    if unknown:
        raise ValueError(
            f"diffusers config has keys {unknown} that SD3Transformer2DModel as understood here "
            f"does not take; expected a subset of {sorted(_DIFFUSERS_DEFAULTS)}"
        )
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in diffusers_cfg.items() if not k.startswith("_")}}
    if c["qk_norm"] not in (None, "rms_norm"):
        raise ValueError(f"qk_norm={c['qk_norm']!r} is not supported; expected None or 'rms_norm'")
    if c["pos_embed_max_size"] is None:
        raise ValueError("pos_embed_max_size=None (no cropped position grid) is not supported")
    return MMDiTConfig(
        depth=c["num_layers"],
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        num_heads=c["num_attention_heads"],
        patch_size=c["patch_size"],
        in_channels=c["in_channels"],
        out_channels=c["in_channels"] if c["out_channels"] is None else c["out_channels"],
        pos_embed_max_size=c["pos_embed_max_size"],
        sample_size=c["sample_size"],
        context_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        caption_projection_dim=c["caption_projection_dim"],
        mlp_ratio=4.0,
        qk_norm="none" if c["qk_norm"] is None else c["qk_norm"],
        dual_attention_layers=tuple(int(i) for i in c["dual_attention_layers"] or ()),
    )


def to_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: MMDiTConfig
) -> tuple[dict[str, Any], StateDict]:
    """Our state dict -> (SD3Transformer2DModel config, SD3Transformer2DModel state dict)."""
    dcfg = diffusers_config(config)
    _ours_checked(state_dict, config)
    return dcfg, _apply_forward(_diffusers_rules(config), state_dict)


def from_diffusers(
    state_dict: Mapping[str, torch.Tensor], diffusers_cfg: Mapping[str, Any]
) -> tuple[MMDiTConfig, StateDict]:
    """SD3Transformer2DModel (config, state dict) -> (MMDiTConfig, our state dict)."""
    config = config_from_diffusers(diffusers_cfg)
    rules = _diffusers_rules(config)
    expected = _their_shapes(rules, _expected_shapes(config))
    check_state_dict(
        state_dict,
        expected,
        f"diffusers SD3Transformer2DModel state dict for {dict(diffusers_cfg)}",
    )
    return config, _apply_backward(rules, state_dict)


def to_diffusers_lora(
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: MMDiTConfig
) -> StateDict:
    """A LoRA on our modules -> the LoRA state dict diffusers loads
    (`StableDiffusion3Pipeline.load_lora_weights`, keys
    `transformer.<diffusers module>.lora_{A,B}.weight`).

    `lora` maps our Linear's name (`blocks.0.x.attn.qkv`) to (A (r, in), B (out, r)) with the
    scale already folded into B: diffusers reads a file without alphas as alpha = rank. The
    base-weight rules decide the layout: a fused qkv becomes to_q/to_k/to_v with A shared and
    B split in three row blocks (W = [Wq; Wk; Wv], so B @ A splits by rows the same way); a
    (shift, scale) modulation whose rows diffusers keeps as (scale, shift) gets B's rows
    swapped the same way.
    """
    rules = {r.ours: r for r in _diffusers_rules(config)}
    out: StateDict = {}
    for module, (a, b) in lora.items():
        rule = rules.get(f"{module}.weight")
        if rule is None:
            raise ValueError(
                f"LoRA on {module}: not a Linear that diffusers' SD3Transformer2DModel has"
            )
        if rule.kind == "split":
            parts = b.chunk(len(rule.theirs), dim=0)
        elif rule.kind == "swap":
            parts = (_swap_halves(b),)
        else:
            parts = (b,)
        for name, part in zip(rule.theirs, parts, strict=True):
            prefix = "transformer." + name.removesuffix(".weight")
            out[f"{prefix}.lora_A.weight"] = a.detach().clone().contiguous()
            out[f"{prefix}.lora_B.weight"] = part.detach().clone().contiguous()
    return out


def save_diffusers(
    folder: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: MMDiTConfig
) -> Path:
    """Write a folder that SD3Transformer2DModel.from_pretrained(folder) loads."""
    from safetensors.torch import save_file

    dcfg, dsd = to_diffusers(state_dict, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": _diffusers_version()}
    (folder / DIFFUSERS_CONFIG).write_text(json.dumps({**meta, **dcfg}, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in dsd.items()}
    save_file(tensors, str(folder / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    return folder


def load_diffusers(folder: str | os.PathLike) -> tuple[MMDiTConfig, StateDict]:
    """Read a diffusers transformer folder (or a pipeline folder with transformer/)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (
        not (folder / DIFFUSERS_CONFIG).exists()
        and (folder / "transformer" / DIFFUSERS_CONFIG).exists()
    ):
        folder = folder / "transformer"
    if not (folder / DIFFUSERS_CONFIG).exists():
        raise FileNotFoundError(f"{folder} has no {DIFFUSERS_CONFIG}; expected a diffusers folder")
    dcfg = json.loads((folder / DIFFUSERS_CONFIG).read_text())
    if (folder / DIFFUSERS_WEIGHTS).exists():
        sd = load_file(str(folder / DIFFUSERS_WEIGHTS))
    elif (folder / DIFFUSERS_INDEX).exists():
        index = json.loads((folder / DIFFUSERS_INDEX).read_text())
        sd = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(str(folder / shard)))
    else:
        raise FileNotFoundError(f"{folder} has neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX}")
    return from_diffusers(sd, dcfg)


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:
        return "0.30.0"


# --------------------------------------------------------------------------------------------
# SD3 single file (Stability reference names)
# --------------------------------------------------------------------------------------------


def to_sd3_single_file(state_dict: Mapping[str, torch.Tensor], config: MMDiTConfig) -> StateDict:
    """Our state dict -> ``model.diffusion_model.*`` names of Stability's sd3_impls.py."""
    _ours_checked(state_dict, config)
    return _apply_forward(_single_file_rules(config), state_dict)


def from_sd3_single_file(
    state_dict: Mapping[str, torch.Tensor], **config_overrides: Any
) -> tuple[MMDiTConfig, StateDict]:
    """SD3 single-file state dict -> (MMDiTConfig, our state dict).

    The architecture is read off the shapes. Two things are not in the weights: the head count
    when there is no QK-norm (SD3 always uses head_dim 64, assumed unless num_heads is given)
    and sample_size (128 for all released models). Pass them as config_overrides if they differ.
    Keys outside ``model.diffusion_model.`` (text encoders, VAE in all-in-one files) are ignored
    when that prefix is present.
    """
    sd = dict(state_dict)
    if any(k.startswith(SINGLE_FILE_PREFIX) for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith(SINGLE_FILE_PREFIX)}
    else:
        sd = {SINGLE_FILE_PREFIX + k: v for k, v in sd.items()}
    config = _infer_single_file_config(sd, config_overrides)
    rules = _single_file_rules(config)
    expected = _their_shapes(rules, _expected_shapes(config))
    check_state_dict(sd, expected, f"SD3 single-file state dict for {config}")
    return config, _apply_backward(rules, sd)


def _infer_single_file_config(
    sd: Mapping[str, torch.Tensor], overrides: Mapping[str, Any]
) -> MMDiTConfig:
    P = SINGLE_FILE_PREFIX
    need = [
        "x_embedder.proj.weight",
        "context_embedder.weight",
        "y_embedder.mlp.0.weight",
        "final_layer.linear.weight",
        "pos_embed",
        "joint_blocks.0.x_block.mlp.fc1.weight",
    ]
    missing = [P + k for k in need if P + k not in sd]
    if missing:
        raise ValueError(
            f"not an SD3 single-file MMDiT state dict: missing keys {missing} (expected "
            f"'{P}joint_blocks.N.x_block...' names as in Stability's sd3_impls.py)"
        )
    block_ids = {int(k[len(P) :].split(".")[1]) for k in sd if k.startswith(P + "joint_blocks.")}
    dual = sorted({int(k[len(P) :].split(".")[1]) for k in sd if ".x_block.attn2." in k})
    hidden, context_dim = sd[P + "context_embedder.weight"].shape
    patch_w = sd[P + "x_embedder.proj.weight"]
    p = patch_w.shape[-1]
    n_pos = sd[P + "pos_embed"].shape[1]
    grid = round(n_pos**0.5)
    if grid * grid != n_pos:
        raise ValueError(f"{P}pos_embed has {n_pos} positions, not a square grid")
    ln_q = sd.get(P + "joint_blocks.0.x_block.attn.ln_q.weight")
    inferred: dict[str, Any] = {
        "depth": max(block_ids) + 1,
        "hidden_size": hidden,
        "num_heads": hidden // ln_q.shape[0] if ln_q is not None else max(hidden // 64, 1),
        "patch_size": p,
        "in_channels": patch_w.shape[1],
        "out_channels": sd[P + "final_layer.linear.weight"].shape[0] // (p * p),
        "pos_embed_max_size": grid,
        "context_dim": context_dim,
        "pooled_dim": sd[P + "y_embedder.mlp.0.weight"].shape[1],
        "mlp_ratio": sd[P + "joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
        "qk_norm": "rms_norm" if ln_q is not None else "none",
        "dual_attention_layers": tuple(dual),
    }
    return MMDiTConfig(**{**inferred, **overrides})
