"""Random text encoders of the tiny SD3 set with SD3's output widths.

CLIP-L and OpenCLIP-bigG roles (pooled 768 + 1280 = 2048) and a T5 v1.1 encoder of width 4096,
each tiny inside and seeded, saved as safetensors in the transformers layout.
"""

from __future__ import annotations

from pathlib import Path

from mmdit.testing.spec import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, T5_D_MODEL, T5_TINY, seeded


def write_clip_text_encoder(
    folder: Path, seed: int, tiny: dict, projection_dim: int, hidden_act: str, pad_token_id: int
) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        **tiny,
    )
    with seeded(seed):
        model = CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)


def t5_vocab_rows(n_tokens: int) -> int:
    """Embedding rows: len(tokenizer) rounded up to 128, as T5 does (32100 tokens, 32128 rows)."""
    return -(-n_tokens // 128) * 128


def write_t5_encoder(folder: Path, seed: int, n_tokens: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=t5_vocab_rows(n_tokens),
        d_model=T5_D_MODEL,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (what SD3's T5-XXL is)
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        # T5 v1.1 says False; transformers 5 stores True regardless (it only uses the flag to
        # decide decoder-output scaling, which an encoder never does).
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **T5_TINY,
    )
    with seeded(seed):
        model = T5EncoderModel(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
