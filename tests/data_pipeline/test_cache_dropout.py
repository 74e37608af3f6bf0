"""CFG dropout on cached text embeddings == `TextEncoders.encode(prompts, dropped=...)`."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from data_pipeline.cache_format import (
    EMPTY_PROMPT,
    apply_text_dropout,
    encode_tensors,
    load_empty_prompt,
)
from data_pipeline.cache_info import make_layout
from data_pipeline.precompute import main as precompute_main
from mmdit.conditioning import TextEncoders
from tests.data_pipeline.conftest import good_members, make_tar

# Not 77, so that a mix-up of clip_length and t5_length shows.
T5_LENGTH = 32
PROMPTS = [
    "a photo of an astronaut",
    "a cat on a sofa",
    "",
    "a red square, oil on canvas, very detailed and long caption that goes on",
    "coffee",
    "two dogs",
    "a city at night",
    "rocket launch",
]
# Every combination of the three encoders, one per prompt.
ALL_COMBINATIONS = torch.tensor(list(itertools.product((False, True), repeat=3)))


@pytest.fixture(scope="module")
def components(tiny_components) -> Path:
    """The session's tiny SD3 components (tests/conftest.py)."""
    return tiny_components


@pytest.fixture(scope="module")
def text(components) -> TextEncoders:
    return TextEncoders.from_pretrained(components, t5_max_length=T5_LENGTH)


@pytest.fixture(scope="module")
def clean(text):
    """(context, pooled) of PROMPTS without dropout."""
    emb = text.encode(PROMPTS)
    assert not emb.dropped.any()
    return emb.context, emb.pooled


@pytest.fixture(scope="module")
def empty(text):
    emb = text.encode([""])
    return emb.context[0], emb.pooled[0]


MASKS = {
    "none": torch.zeros(len(PROMPTS), 3, dtype=torch.bool),
    "all": torch.ones(len(PROMPTS), 3, dtype=torch.bool),
    "each_combination": ALL_COMBINATIONS,
    "only_clip_l": torch.tensor([[True, False, False]] * len(PROMPTS)),
    "only_t5_some": torch.tensor([[False, False, i % 2 == 0] for i in range(len(PROMPTS))]),
    "random": torch.rand(len(PROMPTS), 3, generator=torch.Generator().manual_seed(3)) < 0.463,
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_matches_encoder_dropout_exactly(name, text, clean, empty):
    dropped = MASKS[name]
    want = text.encode(PROMPTS, dropped=dropped)
    context, pooled = clean
    before = (context.clone(), pooled.clone())
    got_context, got_pooled = apply_text_dropout(
        context, pooled, dropped, *empty, make_layout(text)
    )
    assert got_context.dtype == torch.float32
    assert torch.equal(got_context, want.context)
    assert torch.equal(got_pooled, want.pooled)
    # new tensors; the inputs are untouched
    assert got_context.data_ptr() != context.data_ptr()
    assert got_pooled.data_ptr() != pooled.data_ptr()
    assert torch.equal(context, before[0]) and torch.equal(pooled, before[1])


def test_dropped_parts_are_what_the_docs_say(text, clean, empty):
    layout = make_layout(text)
    c, dl, dg, pl = layout.clip_length, layout.clip_l_dim, layout.clip_g_dim, layout.pooled_l_dim
    context, pooled = clean
    dropped = ALL_COMBINATIONS
    got_c, got_p = apply_text_dropout(context, pooled, dropped, *empty, layout)
    e_c, e_p = empty
    for i, (l_, g_, t_) in enumerate(dropped.tolist()):
        src_c = e_c if l_ else context[i]
        src_p = e_p if l_ else pooled[i]
        assert torch.equal(got_c[i, :c, :dl], src_c[:c, :dl])
        assert torch.equal(got_p[i, :pl], src_p[:pl])
        src_c = e_c if g_ else context[i]
        src_p = e_p if g_ else pooled[i]
        assert torch.equal(got_c[i, :c, dl : dl + dg], src_c[:c, dl : dl + dg])
        assert torch.equal(got_p[i, pl:], src_p[pl:])
        assert torch.equal(got_c[i, :c, dl + dg :], context[i, :c, dl + dg :])  # zero padding
        t5 = got_c[i, c:]
        assert t5.shape[0] == T5_LENGTH
        assert torch.equal(t5, torch.zeros_like(t5)) if t_ else torch.equal(t5, context[i, c:])


def test_low_precision_and_batched_empty_prompt(text, clean, empty):
    """bf16 batch with an fp32 (batched) empty prompt: cast to the batch's dtype."""
    layout = make_layout(text)
    context, pooled = (t.to(torch.bfloat16) for t in clean)
    e_c, e_p = empty
    dropped = ALL_COMBINATIONS
    got_c, got_p = apply_text_dropout(context, pooled, dropped, e_c[None], e_p[None], layout)
    want_c, want_p = apply_text_dropout(
        context, pooled, dropped, e_c.to(torch.bfloat16), e_p.to(torch.bfloat16), layout
    )
    assert got_c.dtype == got_p.dtype == torch.bfloat16
    assert torch.equal(got_c, want_c) and torch.equal(got_p, want_p)
    full = text.encode(PROMPTS, dropped=dropped)
    torch.testing.assert_close(got_c.float(), full.context, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(got_p.float(), full.pooled, rtol=2**-7, atol=1e-3)


@pytest.mark.gpu
def test_on_cuda(text, clean, empty):
    layout = make_layout(text)
    context, pooled = (t.cuda() for t in clean)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the CPU mask: nothing may wait for the GPU
    try:
        got_c, got_p = apply_text_dropout(context, pooled, ALL_COMBINATIONS, *empty, layout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got_c.is_cuda and got_p.is_cuda
    want_c, want_p = apply_text_dropout(*clean, ALL_COMBINATIONS, *empty, layout)
    assert torch.equal(got_c.cpu(), want_c) and torch.equal(got_p.cpu(), want_p)


def test_shape_errors(text, clean, empty):
    layout = make_layout(text)
    context, pooled = clean
    e_c, e_p = empty
    B = len(PROMPTS)
    ok = torch.zeros(B, 3, dtype=torch.bool)
    cases = [
        ((context[0], pooled, ok, e_c, e_p), "context must be"),
        ((context, pooled[:2], ok, e_c, e_p), "batch"),
        ((context, pooled, ok[:, :2], e_c, e_p), "dropped must be"),
        ((context, pooled, ok.int(), e_c, e_p), "dropped must be"),
        ((context[:, :-1], pooled, ok, e_c[:-1], e_p), "layout"),
        ((context, pooled, ok, e_c[:-1], e_p), "empty prompt"),
        ((context, pooled, ok, e_c, e_p[:-1]), "empty prompt"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            apply_text_dropout(*args, layout)


# ---------------------------------------------------------------------------------------------
# the empty prompt of a real cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory, components, photos) -> Path:
    root = tmp_path_factory.mktemp("dropout_cache")
    shards = root / "shards"
    shards.mkdir()
    members = good_members("000", photos[0]) + good_members("001", photos[3])
    (shards / "000000.tar").write_bytes(make_tar(members))
    run_file = root / "run.yaml"
    run_file.write_text(
        f"conditioning:\n  components: {components}\n  dtype: fp32\n"
        f"  t5_max_length: {T5_LENGTH}\n"
        f"data:\n  shards: {shards}\n  resolution: 64\n"
    )
    out = root / "cache"
    args = ["--config", str(run_file), "--out", str(out), "--device", "cpu", "--rank", "0"]
    assert precompute_main([*args, "--world-size", "1"]) == 0
    return out


def test_load_empty_prompt_from_a_cache(cache, text, empty):
    context, pooled = load_empty_prompt(cache)
    L = 77 + T5_LENGTH
    assert context.shape == (L, 4096) and pooled.shape == (2048,)
    assert context.dtype == pooled.dtype == torch.bfloat16
    e_c, e_p = empty
    torch.testing.assert_close(context.float(), e_c, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(pooled.float(), e_p, rtol=2**-7, atol=1e-3)
    # and it drops in for the encoders' own empty prompt (to bf16 precision)
    emb = text.encode(PROMPTS[:4])
    dropped = ALL_COMBINATIONS[3:7]
    got_c, got_p = apply_text_dropout(
        emb.context, emb.pooled, dropped, context, pooled, make_layout(text)
    )
    want = text.encode(PROMPTS[:4], dropped=dropped)
    torch.testing.assert_close(got_c, want.context, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(got_p, want.pooled, rtol=2**-7, atol=1e-3)


def test_load_empty_prompt_batched_and_missing(tmp_path, empty):
    e_c, e_p = empty
    (tmp_path / EMPTY_PROMPT).write_bytes(
        encode_tensors({"context": e_c[None], "pooled": e_p[None]})
    )
    context, pooled = load_empty_prompt(tmp_path)
    assert torch.equal(context, e_c) and torch.equal(pooled, e_p)

    (tmp_path / EMPTY_PROMPT).write_bytes(encode_tensors({"context": e_c}))
    with pytest.raises(ValueError, match="pooled"):
        load_empty_prompt(tmp_path)

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="mmdit-precompute") as info:
        load_empty_prompt(missing)
    assert str(missing / EMPTY_PROMPT) in str(info.value)
