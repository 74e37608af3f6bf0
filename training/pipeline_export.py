"""A complete diffusers pipeline folder from a training checkpoint (`mmdit-export --format
diffusers-pipeline`): what `StableDiffusion3Pipeline.from_pretrained(OUT)` loads on its own.

    OUT/model_index.json     StableDiffusion3Pipeline and its parts
    OUT/transformer/         the trained MMDiT (mmdit.convert.save_diffusers)
    OUT/scheduler/           FlowMatchEulerDiscreteScheduler with the run's sampling shift
                             (eval.shift, or the training shift it matches), so the pipeline
                             samples as mmdit-sample does at the default size
    OUT/text_encoder*/, tokenizer*/, vae/
                             copied (or hard-linked, or symlinked) from the run's frozen
                             components (conditioning.components or --components)
    OUT/README.md            model card: the run's config, data, steps, FLOPs, eval numbers
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmdit.model import MMDiTConfig

LINKS = ("copy", "hardlink", "symlink")
# (subfolder, library, class) of the frozen parts; T5's pair is optional in SD3 pipelines.
PARTS = (
    ("text_encoder", "transformers", "CLIPTextModelWithProjection"),
    ("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
    ("text_encoder_3", "transformers", "T5EncoderModel"),
    ("tokenizer", "transformers", "CLIPTokenizer"),
    ("tokenizer_2", "transformers", "CLIPTokenizer"),
    ("tokenizer_3", "transformers", "T5TokenizerFast"),
    ("vae", "diffusers", "AutoencoderKL"),
)
OPTIONAL = {"text_encoder_3", "tokenizer_3"}


def component_dirs(
    run_config: Mapping[str, Any], components: str | os.PathLike | None
) -> dict[str, Path | None]:
    """Where each frozen part comes from: `components` (or the run's conditioning.components)
    with the run's per-component overrides; None for an absent T5 (allowed by SD3)."""
    from mmdit.conditioning.components import ComponentError, resolve

    cond = run_config.get("conditioning") or {}
    root = components or cond.get("components") or None
    overrides = {
        name: cond.get(f"{name}_path")
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        if cond.get(f"{name}_path")
    }
    if components:
        overrides = {}  # an explicit --components replaces the run's layout entirely
    if root is None and not overrides:
        raise ComponentError(
            "--format diffusers-pipeline needs the frozen components: the run has no "
            "conditioning.components; pass --components DIR (an SD3 diffusers folder)"
        )
    out: dict[str, Path | None] = {}
    for name, _, _ in PARTS:
        if name.startswith("tokenizer"):
            # Tokenizers sit beside their encoders' root (no per-tokenizer override).
            path = Path(root) / name if root else None
            if path is None or not path.is_dir():
                if name in OPTIONAL:
                    out[name] = None
                    continue
                raise ComponentError(
                    f"tokenizer {name}: no folder {path}; pass --components DIR (an SD3 "
                    "diffusers folder with tokenizer/, tokenizer_2/, tokenizer_3/)"
                )
            out[name] = path
            continue
        try:
            out[name] = resolve(name, root, overrides)
        except ComponentError:
            if name not in OPTIONAL:
                raise
            out[name] = None
    if (out["text_encoder_3"] is None) != (out["tokenizer_3"] is None):
        raise ComponentError("text_encoder_3 and tokenizer_3 must be both present or both absent")
    return out


def _place(src: Path, dst: Path, link: str) -> None:
    if link == "symlink":
        dst.symlink_to(src.resolve(), target_is_directory=True)
    elif link == "hardlink":
        shutil.copytree(src, dst, copy_function=os.link)
    else:
        shutil.copytree(src, dst)


def write_scheduler(folder: Path, source: Path | None, shift: float) -> None:
    """FlowMatchEulerDiscreteScheduler: the components' scheduler config if there is one
    (SD3's has 1000 steps), with the run's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if source is not None and (source / "scheduler_config.json").is_file():
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(source), shift=shift)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.save_pretrained(str(folder))


def pipeline_shift(run_config: Mapping[str, Any], config: MMDiTConfig) -> float:
    """The scheduler's shift: what mmdit-sample uses for this run (flow.sampling_shift)
    at the pipeline's default size (sample_size x 8 pixels square). A diffusers scheduler has
    one shift, so a run trained with the resolution-dependent rule
    (train.shift_base_resolution) gets its value at that size."""
    from mmdit.conditioning.vae import SPATIAL_FACTOR
    from mmdit.flow import sampling_shift

    side = config.sample_size * SPATIAL_FACTOR
    return sampling_shift(run_config, side, side)


def write_pipeline(
    tmp: Path,
    state_dict: dict[str, torch.Tensor],
    config: MMDiTConfig,
    run_config: Mapping[str, Any],
    card: str,
    components: str | os.PathLike | None,
    link: str,
) -> None:
    import diffusers

    from mmdit import convert

    parts = component_dirs(run_config, components)
    tmp.mkdir(parents=True)
    convert.save_diffusers(tmp / "transformer", state_dict, config)
    root = components or (run_config.get("conditioning") or {}).get("components")
    scheduler_src = Path(root) / "scheduler" if root else None
    write_scheduler(tmp / "scheduler", scheduler_src, pipeline_shift(run_config, config))
    index: dict[str, Any] = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
    }
    for name, library, cls in PARTS:
        src = parts[name]
        if src is None:
            index[name] = [None, None]
            continue
        _place(src, tmp / name, link)
        index[name] = [library, cls]
    (tmp / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    (tmp / "README.md").write_text(card)


def _last_metrics(run_dir: Path, step: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """The newest value of each of `keys` logged at or before `step` in RUN/metrics.jsonl."""
    found: dict[str, Any] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if row.get("step", step + 1) <= step:
            found.update({k: (row["step"], row[k]) for k in keys if k in row})
    return found


def model_card(step_dir: Path, config: MMDiTConfig, weights: str, merged: bool) -> str:
    """README.md for an exported pipeline: what was trained, on what, for how long."""
    from mmdit.checkpoints import CONFIG_FILE, read_run_config

    run = read_run_config(step_dir)
    run_dir = step_dir.parent.parent
    cond = run.get("conditioning") or {}
    lines = [
        f"# {run_dir.name}",
        "",
        "A Stable-Diffusion-3-style MMDiT text-to-image pipeline exported by `mmdit-export "
        "--format diffusers-pipeline`.",
        "",
        "```python",
        "from diffusers import StableDiffusion3Pipeline",
        "pipe = StableDiffusion3Pipeline.from_pretrained(PATH)",
        f"image = pipe(PROMPT, max_sequence_length={int(cond.get('t5_max_length', 77))}).images[0]"
        "  # the T5 length this model was trained with",
        "```",
        "",
        *_card_training(step_dir, run, config, weights, merged),
        "",
        "## Evaluation",
        "",
        *_card_evaluation(step_dir, run_dir),
        "",
        f"## Training config (`{CONFIG_FILE}` of the checkpoint)",
        "",
        "```yaml",
        (step_dir / CONFIG_FILE).read_text().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _card_training(
    step_dir: Path, run: dict, config: MMDiTConfig, weights: str, merged: bool
) -> list[str]:
    """The card's Training section: checkpoint, model, LoRA, steps, compute, data, sampling."""
    from mmdit.checkpoints import client_file_name, read_manifest
    from mmdit.flops import param_counts, sample_tokens, train_flops_per_sample

    step = int(read_manifest(step_dir)["step"])
    client = step_dir / client_file_name(0)
    global_batch = json.loads(client.read_text()).get("global_batch") if client.is_file() else None
    data = run.get("data") or {}
    cond = run.get("conditioning") or {}
    lora = run.get("lora") or {}
    resolution, t5_max_length = int(data.get("resolution", 256)), int(cond.get("t5_max_length", 77))
    image_tokens, text_tokens = sample_tokens(config, resolution, t5_max_length)
    params = param_counts(config)["total"]
    lines = [
        "## Training",
        "",
        f"- checkpoint: `{step_dir}` (step {step}, {weights} weights)",
        f"- model: depth {config.depth}, hidden {config.hidden_size}, {params:,} parameters",
    ]
    if int(lora.get("rank", 0)):
        lines.append(
            f"- LoRA fine-tuning: rank {lora['rank']}, alpha {lora.get('alpha') or lora['rank']},"
            f" targets {', '.join(lora.get('targets', []))}"
            + (" (merged into these weights)" if merged else "")
        )
    init_from = (run.get("train") or {}).get("init_from")
    if init_from:
        lines.append(f"- initialised from: `{init_from}`")
    if global_batch:
        samples = step * int(global_batch)
        flops = samples * train_flops_per_sample(config, resolution, t5_max_length)
        lines += [
            f"- steps: {step} x global batch {global_batch} = {samples:,} samples",
            f"- training compute: {flops:.3e} FLOPs (6 P N + 12 D h N^2 per sample at "
            f"{data.get('resolution')} px, {image_tokens} image + {text_tokens} text tokens; "
            "mmdit.flops)",
        ]
    else:
        lines.append(f"- steps: {step}")
    lines += [
        f"- data: {data.get('cache_shards') or data.get('shards') or '(not recorded)'} at "
        f"{data.get('resolution')} px",
        f"- sampling defaults (eval section): {run.get('eval', {}).get('sample_steps')} steps,"
        f" CFG {run.get('eval', {}).get('cfg_scale')}; the scheduler's shift is "
        f"{pipeline_shift(run, config):g} (the run's sampling shift at "
        f"{config.sample_size * 8} px)",
    ]
    return lines


def _card_evaluation(step_dir: Path, run_dir: Path) -> list[str]:
    """The card's Evaluation section: the last logged metrics and any mmdit-eval tables."""
    from mmdit.checkpoints import read_manifest

    step = int(read_manifest(step_dir)["step"])
    lines = []
    logged = _last_metrics(run_dir, step, ("loss", "val_loss", "fid", "clip_score"))
    tables = sorted(run_dir.glob("eval*/table.json"))
    if not logged and not tables:
        lines.append("No evaluation numbers were recorded for this run.")
    for key, (at, value) in logged.items():
        lines.append(f"- {key}: {value:.5g} (step {at}, RUN/metrics.jsonl)")
    for table in tables:
        lines += ["", f"`{table.relative_to(run_dir)}`:", "", "```json", table.read_text(), "```"]
    return lines
