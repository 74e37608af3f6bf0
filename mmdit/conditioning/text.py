"""SD3's three frozen text encoders -> (context, pooled) for the MMDiT.

context (B, 77 + T5_len, 4096): CLIP-L and bigG penultimate hidden states concatenated
channel-wise (768 + 1280 = 2048 for the real encoders), zero-padded to the T5 width (4096), then
the T5 hidden states appended along the sequence. pooled (B, 2048): CLIP-L and bigG projected
pooled outputs. This is diffusers' StableDiffusion3Pipeline.encode_prompt with one prompt for
all three encoders and no clip_skip.

CFG dropout (SD3 paper, section 5.3.1): each encoder is dropped independently with
p = 0.463, so all three together are dropped ~10% of the time. A dropped CLIP encoder gives
its embedding of the empty prompt (hidden states and pooled vector), as SD3's training code
encodes "" for unconditional samples and the sampler's negative prompt "" is encoded the same
way at inference; a dropped T5 gives zeros, the same as running without T5 at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmdit.conditioning.components import (
    ComponentError,
    identity,
    identity_hash,
    load_pretrained,
    resolve,
)

CLIP_LENGTH = 77
CONTEXT_DIM = 4096  # SD3's joint-attention width (T5-XXL d_model)
DEFAULT_DROPOUT = 0.463


@dataclass
class TextEmbeddings:
    context: torch.Tensor  # (B, 77 + T5_len, 4096)
    pooled: torch.Tensor  # (B, 2048)
    dropped: torch.Tensor  # (B, 3) bool: CLIP-L, bigG, T5 dropped for CFG


def draw_dropout(batch: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, 3) bool: an independent Bernoulli(p) per sample and per encoder."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"text dropout p={p} must be in [0, 1]")
    return torch.rand(batch, 3, generator=generator) < p


class _ClipEncoder:
    """One CLIP tokenizer + CLIPTextModelWithProjection, with its empty-prompt embedding."""

    def __init__(self, tokenizer, model):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=CLIP_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.model.device)
        out = self.model(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds  # (B, 77, Dclip), (B, Dproj)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._empty is None or self._empty[0].device != self.model.device:
            self._empty = self([""])
        return self._empty


class TextEncoders:
    """CLIP-L + OpenCLIP bigG + (optional) T5-XXL, frozen, producing SD3 conditioning."""

    def __init__(
        self,
        clip_l: tuple[Any, Any],
        clip_g: tuple[Any, Any],
        t5: tuple[Any, Any] | None = None,
        *,
        t5_max_length: int = CLIP_LENGTH,
        identities: Mapping[str, Any] | None = None,
    ):
        """Each encoder is (tokenizer, model); t5=None means T5 is absent (zeros)."""
        if t5_max_length < 1:
            raise ValueError(f"t5_max_length={t5_max_length} must be >= 1 (SD3 uses 77 or 256)")
        self.clip_l = _ClipEncoder(*clip_l)
        self.clip_g = _ClipEncoder(*clip_g)
        self.t5_tokenizer, self.t5 = t5 if t5 is not None else (None, None)
        if self.t5 is not None:
            self.t5.eval().requires_grad_(False)
        self.t5_max_length = t5_max_length
        self.context_dim = self.t5.config.d_model if self.t5 is not None else CONTEXT_DIM
        self._identities = dict(identities or {})

    # ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        root: str | os.PathLike | None = None,
        *,
        paths: Mapping[str, str | os.PathLike] | None = None,
        use_t5: bool = True,
        t5_max_length: int = CLIP_LENGTH,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> TextEncoders:
        """Load from an SD3-layout directory `root`; `paths` overrides single components by
        subfolder name (e.g. {"text_encoder_3": "/models/t5-xxl"}). Nothing is downloaded."""
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        paths = dict(paths or {})
        names = ["tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"]
        if use_t5:
            names += ["tokenizer_3", "text_encoder_3"]
        dirs = {name: resolve(name, root, paths) for name in names}
        loaded = {}
        for name in names:
            if name.startswith("tokenizer"):
                tok_cls = T5TokenizerFast if name == "tokenizer_3" else CLIPTokenizer
                loaded[name] = load_pretrained(name, dirs[name], tok_cls.from_pretrained)
            else:
                model_cls = (
                    T5EncoderModel if name == "text_encoder_3" else (CLIPTextModelWithProjection)
                )
                model = load_pretrained(name, dirs[name], model_cls.from_pretrained, dtype=dtype)
                loaded[name] = model.to(device)
        for name in ("text_encoder", "text_encoder_2"):
            if loaded[name].config.model_type not in ("clip_text_model", "clip"):
                raise ComponentError(
                    f"'{name}' at {dirs[name]} is a {loaded[name].config.model_type} model, "
                    "not a CLIP text encoder with projection"
                )
        identities = {name: identity(name, dirs[name]).as_dict() for name in names}
        return cls(
            (loaded["tokenizer"], loaded["text_encoder"]),
            (loaded["tokenizer_2"], loaded["text_encoder_2"]),
            (loaded["tokenizer_3"], loaded["text_encoder_3"]) if use_t5 else None,
            t5_max_length=t5_max_length,
            identities=identities,
        )

    def identity(self) -> dict[str, Any]:
        """What made these embeddings: component paths + config hashes and the settings."""
        return {
            "components": self._identities,
            "t5": self.t5 is not None,
            "t5_max_length": self.t5_max_length,
            "clip_length": CLIP_LENGTH,
            "context_dim": self.context_dim,
        }

    def identity_hash(self) -> str:
        return identity_hash(self.identity())

    @property
    def device(self) -> torch.device:
        return self.clip_l.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip_l.model.dtype

    def to(self, device: torch.device | str) -> TextEncoders:
        for model in (self.clip_l.model, self.clip_g.model, self.t5):
            if model is not None:
                model.to(device)
        return self

    # ---------------------------------------------------------------------------------------

    def encode(
        self,
        prompts: Sequence[str],
        *,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        dropped: torch.Tensor | None = None,
    ) -> TextEmbeddings:
        """Encode a batch of prompts. `dropout` > 0 drops each encoder independently per
        sample (CFG training); `dropped` (B, 3) bool fixes the choice instead."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts; wrap a single prompt in a list")
        B = len(prompts)
        if dropped is None:
            dropped = draw_dropout(B, dropout, generator)
        if dropped.shape != (B, 3):
            raise ValueError(f"dropped must be a (B, 3) bool tensor, got {tuple(dropped.shape)}")
        # Inference mode for speed; the clone below turns the results into normal tensors so
        # the trainer can feed them to modules whose backward saves their inputs.
        dropped = dropped.cpu()
        with torch.inference_mode():
            context, pooled = self._encode(list(prompts), dropped)
        return TextEmbeddings(context.clone(), pooled.clone(), dropped.clone())

    def _encode(self, prompts: list[str], dropped: torch.Tensor):
        # `dropped` stays on the CPU: deciding whether to mix in the empty prompt costs no
        # device sync.
        hidden, pooled = [], []
        for i, encoder in enumerate((self.clip_l, self.clip_g)):
            h, p = encoder(prompts)  # (B, 77, Dclip), (B, Dproj)
            if dropped[:, i].any():
                h_empty, p_empty = encoder.empty()
                keep = (~dropped[:, i]).to(h.device)
                h = torch.where(keep[:, None, None], h, h_empty)
                p = torch.where(keep[:, None], p, p_empty)
            hidden.append(h)
            pooled.append(p)
        clip = torch.cat(hidden, dim=-1)  # (B, 77, Dl + Dg)
        if clip.shape[-1] > self.context_dim:
            raise ComponentError(
                f"CLIP hidden sizes add up to {clip.shape[-1]} > context width "
                f"{self.context_dim}; these encoders do not form an SD3 set"
            )
        clip = F.pad(clip, (0, self.context_dim - clip.shape[-1]))  # (B, 77, 4096)
        t5 = self._encode_t5(prompts)  # (B, T5_len, 4096)
        if dropped[:, 2].any():
            t5 = t5 * (~dropped[:, 2]).to(t5.device, t5.dtype)[:, None, None]
        context = torch.cat([clip.to(t5.dtype), t5], dim=1)  # (B, 77 + T5_len, 4096)
        return context, torch.cat(pooled, dim=-1)  # (B, 2048)

    def _encode_t5(self, prompts: list[str]) -> torch.Tensor:
        B = len(prompts)
        if self.t5 is None:
            shape = (B, self.t5_max_length, self.context_dim)
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        ids = self.t5_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.t5_max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids.to(self.t5.device)
        return self.t5(ids).last_hidden_state  # (B, T5_len, 4096)
