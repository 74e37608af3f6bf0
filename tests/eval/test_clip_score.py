"""CLIP score: equal to a direct open_clip computation, offline-only loading, clear errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from eval.clip_score import ClipScorer
from eval.fid import MissingWeightsError
from tests.eval.conftest import TINY_CLIP_NAME

CAPTIONS = [
    "an astronaut in a white suit",
    "a cup of coffee",
    "a cat",
    "a rocket on the launch pad",
    "deep space full of galaxies",
    "stained tissue under a microscope",
    "a colour wheel",
    "a tabby cat",
    "a man with a camera",
    "old coins",
    "the moon",
    "a clock",
    "the digit zero",
    "the digit one",
    "the digit two",
    "the digit three",
]


@pytest.fixture(scope="module")
def scorer(tiny_clip) -> ClipScorer:
    config_path, checkpoint = tiny_clip
    return ClipScorer(str(config_path), checkpoint, batch_size=5)  # 5: uneven last batch


@pytest.fixture(scope="module")
def pairs(sample_images) -> tuple[torch.Tensor, list[str]]:
    images = torch.cat([sample_images.photos[:12], sample_images.digits[:4]])  # (16, 3, 64, 64)
    return images, CAPTIONS


def direct_open_clip_cosines(tiny_clip, images: torch.Tensor, captions: list[str]) -> np.ndarray:
    """cos(image, text) per pair straight from open_clip, with none of eval.clip_score's code."""
    import open_clip

    config_path, checkpoint = tiny_clip
    open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_CLIP_NAME, pretrained=str(checkpoint)
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(p) for p in pil]))
        txt = model.encode_text(tokenizer(captions))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).numpy()


def test_scores_equal_a_direct_open_clip_computation(scorer, tiny_clip, pairs):
    images, captions = pairs
    scores = scorer.scores(images, captions)
    cosines = direct_open_clip_cosines(tiny_clip, images, captions)
    expected = 100 * np.maximum(cosines, 0)

    assert scores.shape == (16,) and scores.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-5)
    # The random tiny CLIP's cosines are all positive (a shared bias direction), so this
    # compares unclamped values; the clamp has its own test below.
    assert (cosines > 0.05).all()
    assert scores.std() > 1.0  # pair-specific, not one constant


def test_negative_cosines_score_zero(scorer, tiny_clip, pairs, tmp_path):
    # Negating the text projection flips the sign of every text embedding, hence of every
    # cosine: the clamp at 0 must turn every (positive) score into exactly 0.
    config_path, checkpoint = tiny_clip
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["text_projection"] = -state["text_projection"]
    flipped_checkpoint = tmp_path / "flipped.pt"
    torch.save(state, flipped_checkpoint)
    images, captions = pairs
    flipped = ClipScorer(str(config_path), flipped_checkpoint).scores(images, captions)
    assert (scorer.scores(images, captions) > 5).all()
    assert torch.equal(flipped, torch.zeros(16, dtype=torch.float64))


def test_scores_do_not_depend_on_batch_size_or_pairing_order(scorer, tiny_clip, pairs):
    images, captions = pairs
    config_path, checkpoint = tiny_clip
    one_batch = ClipScorer(str(config_path), checkpoint, batch_size=64).scores(images, captions)
    torch.testing.assert_close(scorer.scores(images, captions), one_batch, rtol=0, atol=1e-5)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = scorer.scores(images[order], [captions[i] for i in order])
    torch.testing.assert_close(shuffled, one_batch[order], rtol=0, atol=1e-5)


def test_swapping_captions_changes_the_scores(scorer, pairs):
    # Swapping captions changes the pairs, so the scores must change: guards against a scorer
    # that ignores the text.
    images, captions = pairs
    swapped = scorer.scores(images, captions[1:] + captions[:1])
    assert not torch.allclose(swapped, scorer.scores(images, captions))


def test_model_is_in_eval_mode_and_frozen(scorer):
    assert not scorer._model.training
    assert not any(p.requires_grad for p in scorer._model.parameters())


def test_identity_fingerprints_model_and_checkpoint(scorer, tiny_clip):
    import open_clip

    _, checkpoint = tiny_clip
    identity = scorer.identity
    assert identity["model"] == TINY_CLIP_NAME
    assert identity["checkpoint_file"] == checkpoint.name
    assert identity["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert identity["open_clip"] == open_clip.__version__
    assert len(identity["model_config_sha256"]) == 64


def test_missing_checkpoint_is_a_missing_weights_error_naming_the_path(tiny_clip, tmp_path):
    config_path, _ = tiny_clip
    missing = tmp_path / "clip" / "open_clip_model.safetensors"
    with pytest.raises(MissingWeightsError) as info:
        ClipScorer(str(config_path), missing)
    message = str(info.value)
    assert str(missing) in message
    assert "--clip-checkpoint" in message and "eval.clip_checkpoint" in message

    with pytest.raises(MissingWeightsError, match="empty path"):
        ClipScorer(str(config_path), "")


def test_missing_vit_l_14_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        ClipScorer("ViT-L-14", tmp_path / "nope.bin")
    message = str(info.value)
    assert "https://huggingface.co/timm/vit_large_patch14_clip_224.openai" in message
    assert "open_clip_model.safetensors" in message
    assert "pretrained_tag='openai'" in message  # OpenAI's weights need QuickGELU


def test_caption_count_or_type_mismatch_is_a_clear_error(scorer, pairs):
    images, captions = pairs
    with pytest.raises(ValueError, match="16 images but 15 captions"):
        scorer.scores(images, captions[:15])
    with pytest.raises(TypeError, match="sequence of str"):
        scorer.scores(images[:1], "a single string is not a list of captions")
    with pytest.raises(TypeError, match="uint8"):
        scorer.scores(images.float(), captions)


def test_models_that_would_download_are_refused(tmp_path, tiny_clip):
    _, checkpoint = tiny_clip
    with pytest.raises(ValueError, match="schema"):
        ClipScorer("hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", checkpoint)
    with pytest.raises(ValueError, match="hf_tokenizer_name"):
        ClipScorer("ViT-B-16-SigLIP", checkpoint)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipScorer("No-Such-Model", checkpoint)


def test_pretrained_tag_applies_the_tags_quick_gelu_and_preprocessing(tiny_clip, monkeypatch):
    import open_clip

    config_path, checkpoint = tiny_clip
    real_cfg = open_clip.get_pretrained_cfg
    fake_tag = {"hf_hub": "org/tiny", "quick_gelu": True, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    monkeypatch.setattr(
        open_clip,
        "get_pretrained_cfg",
        lambda name, tag: (
            fake_tag if (name, tag) == (TINY_CLIP_NAME, "fake") else real_cfg(name, tag)
        ),
    )
    tagged = ClipScorer(str(config_path), checkpoint, pretrained_tag="fake")
    plain = ClipScorer(str(config_path), checkpoint)
    act = lambda s: type(s._model.visual.transformer.resblocks[0].mlp.gelu).__name__
    assert (act(tagged), act(plain)) == ("QuickGELU", "GELU")
    normalize = tagged._preprocess.transforms[-1]
    assert tuple(normalize.mean) == (0.5,) * 3 and tuple(normalize.std) == (0.25,) * 3
    assert tagged.identity["model_config_sha256"] != plain.identity["model_config_sha256"]
    assert tagged.identity["pretrained_tag"] == "fake"

    with pytest.raises(ValueError, match="not an open_clip tag"):
        ClipScorer(str(config_path), checkpoint, pretrained_tag="openai")
