"""The tokenizers of the tiny SD3 set, in the files the diffusers SD3 repository has.

``tokenizer`` and ``tokenizer_2`` are the real CLIP BPE (rebuilt from the merges file open_clip
ships), so prompts tokenize exactly as with SD3; ``tokenizer_3`` is a small SentencePiece unigram
model with T5's special ids, trained on ``captions.caption_corpus``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
from pathlib import Path

from mmdit.testing.captions import caption_corpus
from mmdit.testing.spec import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    T5_EXTRA_IDS,
    T5_MODEL_MAX_LENGTH,
    T5_SPM_VOCAB_SIZE,
    write_json,
)

# ---- CLIP BPE (the real one) -----------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (256 entries, fixed order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def _open_clip_bpe_path() -> Path:
    """Locate open_clip's ``bpe_simple_vocab_16e6.txt.gz`` without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed; its CLIP BPE merges file is needed")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE merges file not found at {path}")
    return path


def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The 49,408-token CLIP vocabulary and its 48,894 merges ("a b" strings), in CLIP order."""
    lines = gzip.decompress(_open_clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer(
    folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str
) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )
    tok.save_pretrained(str(folder))
    # transformers 5 writes only tokenizer.json + tokenizer_config.json. The SD3 repo also has
    # the slow-tokenizer files (what transformers 4's CLIPTokenizer and other tools read).
    (folder / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": pad_token,
            "unk_token": "<|endoftext|>",
        },
    )


# ---- T5: a small SentencePiece unigram model ------------------------------------------------


def train_t5_sentencepiece(vocab_size: int = T5_SPM_VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece unigram model with T5's special ids: <pad>=0, </s>=1, <unk>=2."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,  # single thread: byte-identical model on every run
        minloglevel=2,
    )
    return model.getvalue()


def write_t5_tokenizer(folder: Path) -> int:
    """Write spiece.model + the transformers (tokenizers-backed) T5 files; return len(tok)."""
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    spiece = folder / "spiece.model"
    spiece.write_bytes(train_t5_sentencepiece())
    kwargs = dict(
        vocab_file=str(spiece), extra_ids=T5_EXTRA_IDS, model_max_length=T5_MODEL_MAX_LENGTH
    )
    # transformers 5: the sentencepiece -> tokenizers conversion lives in this classmethod
    # (from_pretrained calls it). Calling it directly, rather than from_pretrained on the
    # folder, keeps from_pretrained's bookkeeping ("is_local": ...) out of tokenizer_config.json.
    convert = getattr(T5TokenizerFast, "convert_to_native_format", None)
    tok = T5TokenizerFast(**(convert(**kwargs) if convert is not None else kwargs))
    tok.save_pretrained(str(folder))
    write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)],
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        },
    )
    return len(tok)
