"""CLIP score of (image, caption) pairs with an open_clip model whose weights are a local file.

The score is the one torchmetrics' `CLIPScore` and Hessel et al. (2021, "CLIPScore") report:
100 * max(cos(image embedding, text embedding), 0) per pair; callers average it.

Nothing is downloaded. The architecture comes from open_clip's built-in configs (a model name
such as "ViT-L-14") or from a model-config JSON file; the weights come only from `checkpoint`,
which open_clip's `create_model_and_transforms(name, pretrained=<file path>)` loads with
`torch.load(weights_only=True)` (or safetensors). Architectures whose text tower or tokenizer
open_clip would fetch from the Hugging Face Hub (`hf_model_name` / `hf_tokenizer_name`, e.g.
SigLIP) are refused up front rather than failing deep inside a download on an offline node.

A local checkpoint carries no pretrained-tag metadata, so open_clip falls back to its default
preprocessing (OpenAI mean/std, bicubic, shortest-side resize + centre crop) and to the
architecture's activation. Both matter for OpenAI's weights, which were trained with QuickGELU:
pass `pretrained_tag="openai"` (or use the "ViT-L-14-quickgelu" architecture) with them, or the
embeddings are silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from eval.fid import MissingWeightsError, check_uint8_images, file_sha256

log = logging.getLogger(__name__)

_CLIP_FLAG = "--clip-checkpoint PATH"
_CLIP_CONFIG_KEY = "eval.clip_checkpoint"
_HF_FILES = "open_clip_model.safetensors (or open_clip_pytorch_model.bin)"
# A tag's preprocessing keys -> create_model_and_transforms arguments that apply them.
_TAG_PREPROCESS_ARGS = {
    "mean": "image_mean",
    "std": "image_std",
    "interpolation": "image_interpolation",
    "resize_mode": "image_resize_mode",
}


# --------------------------------------------------------------------------------------------
# Model name / config resolution
# --------------------------------------------------------------------------------------------


def _register_config_file(path: Path) -> str:
    """Make an open_clip model-config JSON known to open_clip; its name is the file stem."""
    import open_clip

    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"CLIP model config {path} is not readable JSON: {exc}") from exc
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(
            f"CLIP model config {path} lacks {missing}; an open_clip model config has "
            f'{{"embed_dim": ..., "vision_cfg": {{...}}, "text_cfg": {{...}}}}'
        )
    name = path.stem
    known = open_clip.get_model_config(name)
    if known == config:
        return name  # registered already (open_clip keeps a global list of config paths)
    if known is not None:
        # open_clip's registry is keyed by file stem: registering would silently replace the
        # other architecture of that name for the whole process.
        raise ValueError(
            f"CLIP model config {path} is named {name!r}, which open_clip already knows with a "
            f"different architecture; rename the file (its stem is the model name)"
        )
    open_clip.add_model_config(path)
    return name


def _resolve_model_name(model: str) -> str:
    """An open_clip model name, registering `model` first when it is a config-file path."""
    import open_clip

    if not model:
        raise ValueError("CLIP model is empty; give an open_clip model name (e.g. 'ViT-L-14')")
    if model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"CLIP model {model!r}: schema-prefixed names load their own weights (from the "
            f"network or a folder) and ignore the checkpoint; give an architecture name such as "
            f"'ViT-L-14' or a model-config .json path, and the weights with {_CLIP_FLAG}"
        )
    if model.endswith(".json") or os.sep in model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP model config file {path} does not exist")
        return _register_config_file(path)
    if open_clip.get_model_config(model) is None:
        raise ValueError(
            f"unknown open_clip model {model!r}; see open_clip.list_models() or pass the path "
            f"of a model-config .json"
        )
    return model


def _refuse_network_components(name: str, config: dict) -> None:
    """Fail clearly for architectures whose text tower / tokenizer open_clip downloads."""
    text_cfg = config.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            raise ValueError(
                f"CLIP model {name!r} uses the Hugging Face component {text_cfg[key]!r} "
                f"(text_cfg.{key}), which open_clip fetches from the Hub; offline CLIP scoring "
                f"supports architectures with open_clip's own text tower and tokenizer "
                f"(e.g. 'ViT-L-14')"
            )


# --------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------


def _download_hint(name: str) -> str:
    """Where to get weights for built-in architecture `name`, from open_clip's tag table."""
    import open_clip

    lines = []
    tags = open_clip.list_pretrained_tags_by_model(name)
    for tag in tags[:4]:
        cfg = open_clip.get_pretrained_cfg(name, tag)
        repo = cfg.get("hf_hub", "").strip("/")
        if not repo:
            continue
        note = ""
        if cfg.get("quick_gelu") and not name.endswith("-quickgelu"):
            note = f"; trained with QuickGELU: also pass pretrained_tag={tag!r}"
        lines.append(f"  https://huggingface.co/{repo}  (tag {tag!r}{note})")
    if not lines:
        return (
            "  the open_clip checkpoint this architecture was trained to (a state dict file "
            "saved with torch.save or safetensors)\n"
        )
    more = f"  ... open_clip.list_pretrained_tags_by_model({name!r}) lists all {len(tags)} tags\n"
    return (
        f"  the file {_HF_FILES} of one of these Hugging Face repos:\n"
        + "\n".join(lines)
        + "\n"
        + (more if len(tags) > len(lines) else "")
    )


def _find_checkpoint(checkpoint: str | os.PathLike, name: str) -> Path:
    path = Path(checkpoint).expanduser() if str(checkpoint) else None
    if path is not None and path.is_file():
        return path.resolve()  # absolute: a relative "openai" must never read as a tag name
    looked = "no checkpoint configured (empty path)" if path is None else f"looked for {path}"
    if path is not None and path.is_dir():
        looked += " (a directory; give the weights file inside it)"
    raise MissingWeightsError(
        f"CLIP checkpoint for open_clip model {name!r} not found: {looked}.\n"
        f"Nothing is downloaded at evaluation time. On a machine with internet access get\n"
        f"{_download_hint(name)}"
        f"copy it to this machine and pass {_CLIP_FLAG} (run-file key {_CLIP_CONFIG_KEY})."
    )


def _tag_overrides(name: str, tag: str | None) -> dict[str, Any]:
    """QuickGELU and preprocessing of pretrained tag `tag` (what a tag download would apply)."""
    import open_clip

    if tag is None:
        return {}
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ValueError(
            f"pretrained_tag={tag!r} is not an open_clip tag of {name!r}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(name)}"
        )
    overrides = {arg: cfg[key] for key, arg in _TAG_PREPROCESS_ARGS.items() if key in cfg}
    overrides["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
    return overrides


# --------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------


def _to_pil(image: torch.Tensor) -> Image.Image:
    # (3, H, W) uint8 -> RGB PIL image, the input open_clip's eval transform expects.
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())


def _check_captions(captions: Any, n_images: int) -> list[str]:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(
            f"captions must be a sequence of str (one per image), got {type(captions).__name__}"
        )
    if len(captions) != n_images:
        raise ValueError(
            f"got {n_images} images but {len(captions)} captions; CLIP score needs exactly one "
            f"caption per image"
        )
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captions {bad[:5]} are not str")
    return list(captions)


class ClipScorer:
    """Per-pair CLIP scores from an open_clip model loaded from a local checkpoint file.

    `model` is an open_clip architecture name ("ViT-L-14") or the path of an open_clip
    model-config JSON (registered with open_clip under its file stem). `pretrained_tag` names the
    open_clip tag the checkpoint was downloaded as, to apply that tag's QuickGELU setting and
    preprocessing (needed for OpenAI's weights: `pretrained_tag="openai"`).
    """

    def __init__(
        self,
        model: str,
        checkpoint: str | os.PathLike,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        *,
        pretrained_tag: str | None = None,
    ):
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.name = _resolve_model_name(str(model))
        self.config = open_clip.get_model_config(self.name)
        _refuse_network_components(self.name, self.config)
        self.checkpoint = _find_checkpoint(checkpoint, self.name)
        self.pretrained_tag = pretrained_tag
        overrides = _tag_overrides(self.name, pretrained_tag)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        clip, _, preprocess = open_clip.create_model_and_transforms(
            self.name, pretrained=str(self.checkpoint), device=self.device, **overrides
        )
        self._model = clip.eval().requires_grad_(False)
        self._preprocess = preprocess  # the model's own eval transform (resize, crop, normalise)
        self._tokenizer = open_clip.get_tokenizer(self.name)
        self._overrides = overrides
        log.info("CLIP scorer: %s from %s on %s", self.name, self.checkpoint, self.device)

    @property
    def identity(self) -> dict[str, Any]:
        """What determines the scores: architecture, overrides, checkpoint bytes, open_clip."""
        import open_clip

        arch = json.dumps({"config": self.config, "overrides": self._overrides}, sort_keys=True)
        return {
            "model": self.name,
            "model_config_sha256": hashlib.sha256(arch.encode()).hexdigest(),
            "pretrained_tag": self.pretrained_tag,
            "checkpoint_file": self.checkpoint.name,
            "checkpoint_sha256": file_sha256(self.checkpoint),
            "open_clip": open_clip.__version__,
        }

    def _embed_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = torch.stack([self._preprocess(_to_pil(img)) for img in images])  # (B, 3, S, S)
        return self._model.encode_image(pixels.to(self.device))  # (B, E)

    def _embed_texts(self, captions: list[str]) -> torch.Tensor:
        # open_clip's tokenizer truncates to the context length (77 tokens for CLIP).
        tokens = self._tokenizer(captions).to(self.device)  # (B, context_length)
        return self._model.encode_text(tokens)  # (B, E)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """CLIP score of each (image, caption) pair: uint8 (N, 3, H, W) + N str -> float64 (N,).

        score = 100 * max(cos(E_image, E_text), 0), the definition of Hessel et al. (2021) and
        torchmetrics' `CLIPScore` (which reports the mean of these).
        """
        check_uint8_images(images)
        captions = _check_captions(captions, images.shape[0])
        out = [torch.empty(0, dtype=torch.float64)]
        for start in range(0, images.shape[0], self.batch_size):
            stop = start + self.batch_size
            img = F.normalize(self._embed_images(images[start:stop]).double(), dim=-1)
            txt = F.normalize(self._embed_texts(captions[start:stop]).double(), dim=-1)
            out.append((100.0 * (img * txt).sum(-1).clamp(min=0)).cpu())  # (B,)
        return torch.cat(out)
