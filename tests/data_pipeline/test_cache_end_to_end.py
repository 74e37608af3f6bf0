"""Image shards -> `mmdit-precompute` -> `build_loader` on the cache: batches hold exactly the
good samples, encoded as the frozen encoders encode them directly; a cache made with other
encoder settings is refused; CFG dropout from the cache's empty prompt matches the encoders'."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from data_pipeline import build_loader
from data_pipeline.buckets import buckets_for, decode_to_bucket
from data_pipeline.cache_format import apply_text_dropout, load_empty_prompt
from data_pipeline.cache_writer import crop_rng
from data_pipeline.config import DataConfig
from data_pipeline.images import image_to_tensor
from data_pipeline.precompute import main as precompute_main
from data_pipeline.tar_samples import iter_samples
from mmdit.conditioning import VAE, StaleEmbeddingsError, TextEncoders, conditioning_identity
from tests.data_pipeline.conftest import good_members, make_tar

T5_LENGTH = 16
RESOLUTION = 64
SEED = 11
BF16 = dict(rtol=2**-7, atol=1e-3)


@pytest.fixture(scope="module")
def components(tiny_components) -> Path:
    """The session's tiny SD3 components (tests/conftest.py)."""
    return tiny_components


@pytest.fixture(scope="module")
def source(tmp_path_factory, photos) -> Path:
    """Two shards: the five photos (three formats, three buckets) and two bad samples."""
    d = tmp_path_factory.mktemp("e2e_source")
    cut = photos[0].data[: len(photos[0].data) // 2]
    shard0 = [
        *good_members("a_astronaut", photos[0]),
        ("a_corrupt.jpg", cut),
        ("a_corrupt.txt", b"half a jpeg"),
        *good_members("a_coffee", photos[1]),
        *good_members("a_chelsea", photos[2]),
    ]
    shard1 = [
        *good_members("b_camera", photos[3]),
        (f"b_nocap.{photos[4].ext}", photos[4].data),
        *good_members("b_grace", photos[4]),
    ]
    (d / "000000.tar").write_bytes(make_tar(shard0))
    (d / "000001.tar").write_bytes(make_tar(shard1))
    return d


GOOD_KEYS = {"a_astronaut", "a_coffee", "a_chelsea", "b_camera", "b_grace"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, components, source) -> Path:
    root = tmp_path_factory.mktemp("e2e_cache")
    run_file = root / "run.yaml"
    run_file.write_text(
        f"conditioning:\n  components: {components}\n  dtype: fp32\n"
        f"  t5_max_length: {T5_LENGTH}\n"
        f"data:\n  shards: {source}\n  resolution: {RESOLUTION}\n  crop: random\n"
        f"  seed: {SEED}\n"
    )
    out = root / "cache"
    argv = ["--config", str(run_file), "--out", str(out), "--device", "cpu", "--batch", "2"]
    assert precompute_main([*argv, "--rank", "0", "--world-size", "1"]) == 0
    return out


def identity(components: Path, **changes) -> dict:
    settings = {"use_t5": True, "t5_max_length": T5_LENGTH, **changes}
    return conditioning_identity(str(components), {}, **settings)


def cache_config(cache: Path) -> DataConfig:
    return DataConfig(
        cache_shards=str(cache),
        resolution=RESOLUTION,
        shuffle_buffer=4,
        num_workers=0,
        seed=SEED,
        max_bad_fraction=0.0,
    )


@pytest.fixture(scope="module")
def batches(cache, components) -> list[dict]:
    """The first 10 batches (4 epochs of 5 samples): every epoch-0 sample has been emitted."""
    loader = build_loader(
        cache_config(cache), 0, 1, batch_size=2, expected_identity=identity(components)
    )
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == 10:
            break
    return out


def source_samples(source: Path) -> dict[str, tuple[str, int, dict]]:
    """key -> (shard basename, index in the shard, raw sample)."""
    out = {}
    for shard in sorted(source.glob("*.tar")):
        for index, sample in enumerate(iter_samples(str(shard))):
            out[sample["__key__"]] = (shard.name, index, sample)
    return out


def test_batches_have_the_cached_tensors(batches):
    L = 77 + T5_LENGTH
    for batch in batches:
        h, w = batch.bucket
        assert batch.mean.shape == batch.logvar.shape == (2, 16, h // 8, w // 8)
        assert batch.context.shape == (2, L, 4096)
        assert batch.pooled.shape == (2, 2048)
        for name in ("mean", "logvar", "context", "pooled"):
            assert getattr(batch, name).dtype == torch.bfloat16, name
        assert batch.crop_top_left.shape == batch.original_size.shape == (2, 2)
        assert len(batch.keys) == len(batch.captions) == 2


def test_keys_are_exactly_the_good_samples(batches):
    seen = [(e, k) for b in batches for e, k in zip(b.epochs, b.keys, strict=True)]
    assert {k for _, k in seen} == GOOD_KEYS
    first_epoch = [k for e, k in seen if e == 0]
    assert sorted(first_epoch) == sorted(GOOD_KEYS)  # each good sample once per epoch
    assert len({b.bucket for b in batches}) == 3  # landscape, square, portrait


def test_batches_equal_direct_encoding(batches, source, components):
    vae = VAE.from_pretrained(components)
    text = TextEncoders.from_pretrained(components, t5_max_length=T5_LENGTH)
    buckets = buckets_for(DataConfig(resolution=RESOLUTION))
    samples = source_samples(source)
    checked = set()
    for batch in batches:
        for i, (epoch, key) in enumerate(zip(batch.epochs, batch.keys, strict=True)):
            if epoch != 0:
                continue
            shard, index, sample = samples[key]
            image_bytes = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
            img, bucket, top_left, original = decode_to_bucket(
                image_bytes, buckets, "random", crop_rng(SEED, shard, index)
            )
            caption = sample["txt"].decode()
            assert batch.bucket == bucket
            assert batch.captions[i] == caption
            assert batch.crop_top_left[i].tolist() == list(top_left)
            assert batch.original_size[i].tolist() == list(original)
            mean, logvar = vae.encode(image_to_tensor(img)[None])
            torch.testing.assert_close(batch.mean[i].float(), mean[0], **BF16)
            torch.testing.assert_close(batch.logvar[i].float(), logvar[0], **BF16)
            emb = text.encode([caption])
            torch.testing.assert_close(batch.context[i].float(), emb.context[0], **BF16)
            torch.testing.assert_close(batch.pooled[i].float(), emb.pooled[0], **BF16)
            checked.add(key)
    assert checked == GOOD_KEYS


def test_dropout_from_the_cache_matches_the_encoders(batches, cache, components):
    loader = build_loader(cache_config(cache), 0, 1, batch_size=2)
    layout = loader.cache_info.layout
    empty_context, empty_pooled = load_empty_prompt(cache)
    text = TextEncoders.from_pretrained(components, t5_max_length=T5_LENGTH)
    dropped = torch.tensor([[True, False, True], [False, True, False]])
    batch = batches[0]
    context, pooled = apply_text_dropout(
        batch.context, batch.pooled, dropped, empty_context, empty_pooled, layout
    )
    assert context.dtype == pooled.dtype == torch.bfloat16
    want = text.encode(batch.captions, dropped=dropped)
    torch.testing.assert_close(context.float(), want.context, **BF16)
    torch.testing.assert_close(pooled.float(), want.pooled, **BF16)


@pytest.mark.parametrize(
    "changes, key",
    [({"use_t5": False}, "t5"), ({"t5_max_length": T5_LENGTH + 1}, "t5_max_length")],
)
def test_other_encoder_settings_are_refused(cache, components, changes, key):
    with pytest.raises(StaleEmbeddingsError, match=key) as info:
        build_loader(
            cache_config(cache),
            0,
            1,
            batch_size=2,
            expected_identity=identity(components, **changes),
        )
    assert "mmdit-precompute" in str(info.value) and str(cache) in str(info.value)


def test_not_a_cache_is_refused(source):
    config = dataclasses.replace(cache_config(source), cache_shards=str(source))
    with pytest.raises(FileNotFoundError, match="mmdit-precompute"):
        build_loader(config, 0, 1, batch_size=2)
