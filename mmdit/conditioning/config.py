"""The `conditioning` section of a run file: where the frozen components are and how to run them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ConditioningConfig:
    # SD3-layout directory (text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer*/,
    # vae/); nothing is downloaded. Single components can point elsewhere below.
    components: str = ""
    text_encoder_path: str = ""
    text_encoder_2_path: str = ""
    text_encoder_3_path: str = ""
    vae_path: str = ""
    use_t5: bool = True  # False: T5 tokens are zeros, as SD3 allows
    t5_max_length: int = 77  # SD3 trained with 77; 256 for longer prompts
    dtype: Literal["fp32", "bf16"] = "bf16"
    vae_chunk_size: int = 8

    def __post_init__(self):
        if not 1 <= self.t5_max_length <= 512:
            raise ValueError(f"t5_max_length={self.t5_max_length} must be in [1, 512]")
        if self.vae_chunk_size < 1:
            raise ValueError(f"vae_chunk_size={self.vae_chunk_size} must be >= 1")

    def paths(self) -> dict[str, str]:
        """Per-component overrides keyed by diffusers subfolder name (empty ones left out)."""
        named = {
            "text_encoder": self.text_encoder_path,
            "text_encoder_2": self.text_encoder_2_path,
            "text_encoder_3": self.text_encoder_3_path,
            "vae": self.vae_path,
        }
        return {name: path for name, path in named.items() if path}
