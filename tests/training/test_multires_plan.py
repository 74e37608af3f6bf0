"""mmdit-plan with several resolutions: the heaviest micro batch decides the memory."""

from __future__ import annotations

from mmdit import typed_config
from training.activation_memory import tokens_per_sample
from training.config import RunConfig


def _tokens(*overrides: str) -> int:
    return tokens_per_sample(typed_config.load(RunConfig, "configs/d24_512px.yaml", overrides))[0]


def test_each_family_counts_with_its_own_micro_batch():
    one = _tokens("train.micro_batch_size=16")  # 512 px: the widest bucket's 1036 tokens
    assert one == 1036
    # 1024 px holds 16 x (512/1024)**2 = 4 samples of at most 4118 tokens: 4 x 4118 / 16 =
    # 1029.5 -> 1030 per planned sample, below 512 px's 1036, which still decides.
    assert _tokens("data.resolutions=[512, 1024]", "train.micro_batch_size=16") == one
    # At micro batch 1 the 1024 px family still holds one sample: its 4118 tokens decide.
    assert _tokens("data.resolutions=[512, 1024]", "train.micro_batch_size=1") == 4118
