"""`mmdit-precompute` end to end on real photographs and the tiny random SD3 components."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipeline.buckets import buckets_for, decode_to_bucket
from data_pipeline.cache_format import (
    CACHE_INFO,
    EMPTY_PROMPT,
    CacheInfo,
    decode_tensors,
)
from data_pipeline.cache_writer import crop_rng
from data_pipeline.config import DataConfig
from data_pipeline.images import image_to_tensor
from data_pipeline.precompute import load_config, main
from data_pipeline.tar_samples import iter_samples
from mmdit.conditioning import VAE, TextEncoders, conditioning_identity
from tests.data_pipeline.image_bytes import encode

# (skimage photo, size (w, h), stored format): three aspect ratios -> all three 64 px buckets.
PHOTOS = (
    ("astronaut", (96, 64), "JPEG"),
    ("coffee", (48, 96), "PNG"),
    ("chelsea", (100, 60), "JPEG"),
    ("camera", (64, 64), "PNG"),
    ("rocket", (40, 80), "JPEG"),
)
SIZES = {f"a photo of {name}": size for name, size, _ in PHOTOS}
CORRUPT_SHARD = "000099.tar"
T5_LENGTH = 77


@pytest.fixture(scope="module")
def components(tiny_components) -> Path:
    """The session's tiny SD3 components (tests/conftest.py)."""
    return tiny_components


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """3 shards from `mmdit-shards write --max-count 2` + one with a corrupt JPEG."""
    from skimage import data

    from data_pipeline.shards import main as shards_main

    root = tmp_path_factory.mktemp("source")
    images = root / "images"
    images.mkdir()
    for name, size, fmt in PHOTOS:
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.BICUBIC)
        ext = "jpg" if fmt == "JPEG" else "png"
        (images / f"{name}.{ext}").write_bytes(encode(img, fmt))
        (images / f"{name}.txt").write_text(f"a photo of {name}")
    shards = root / "shards"
    rc = shards_main(
        ["write", "--out", str(shards), "--images-dir", str(images), "--max-count", "2", "--quiet"]
    )
    assert rc == 0
    good = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")
    with tarfile.open(shards / CORRUPT_SHARD, "w") as tar:
        for member, payload in (
            ("bad_0.jpg", good[: len(good) // 2]),
            ("bad_0.txt", b"half a jpeg"),
            ("red_1.jpg", good),
            ("red_1.txt", b"a red square"),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return shards


def write_run_file(path: Path, components: Path, shards: Path) -> Path:
    path.write_text(
        "model:\n  depth: 2\n"  # other RunConfig sections must be ignored, not rejected
        "train:\n  lr: 1.0e-4\n"
        f"conditioning:\n  components: {components}\n  dtype: fp32\n"
        f"  t5_max_length: {T5_LENGTH}\n"
        f"data:\n  shards: {shards}\n  resolution: 64\n"
    )
    return path


@pytest.fixture(scope="module")
def run_file(tmp_path_factory, components, source) -> Path:
    return write_run_file(tmp_path_factory.mktemp("run") / "run.yaml", components, source)


def precompute(run_file: Path, out: Path, *extra: str) -> int:
    return main(["--config", str(run_file), "--out", str(out), "--device", "cpu", "--batch", "2",
                 *extra])  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory, run_file) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    assert precompute(run_file, out, "--rank", "0", "--world-size", "1") == 0
    return out


def source_names(source: Path) -> list[str]:
    return sorted(p.name for p in source.glob("*.tar"))


def cache_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.tar"))


def read_cache(path: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_samples(str(path))}


def test_load_config_keeps_conditioning_and_data(run_file, components):
    cfg = load_config(run_file, ["data.resolution=128", "train.lr=1.0", "model.depth=3"])
    assert cfg.conditioning.components == str(components)
    assert cfg.conditioning.dtype == "fp32"
    assert cfg.data.resolution == 128


def test_one_cache_shard_per_source_shard(cache, source):
    assert len(source_names(source)) >= 4
    assert cache_names(cache) == source_names(source)
    assert not list(cache.glob("*.tmp"))


def test_samples_match_direct_encoding(cache, source, components):
    text = TextEncoders.from_pretrained(components, t5_max_length=T5_LENGTH)
    vae = VAE.from_pretrained(components)
    buckets = buckets_for(DataConfig(resolution=64))
    seen_buckets = set()
    n = 0
    for name in source_names(source):
        sources = read_cache(source / name)
        cached = read_cache(cache / name)
        expected_keys = {k for k in sources if not k.startswith("bad_")}
        assert set(cached) == expected_keys
        for key, sample in cached.items():
            src = sources[key]
            image_bytes = next(src[e] for e in ("jpg", "png", "webp") if e in src)
            img, bucket, top_left, original = decode_to_bucket(image_bytes, buckets, "center")
            caption = src["txt"].decode().strip()
            meta = json.loads(sample["json"])
            assert meta == {
                "key": key,
                "source_key": key,
                "source_url": str(source / name),
                "caption": caption,
                "bucket": list(bucket),
                "crop_top_left": list(top_left),
                "original_size": list(original),
            }
            if caption in SIZES:
                w, h = SIZES[caption]
                assert original == (h, w)
            tensors = decode_tensors(sample["safetensors"])
            h, w = bucket
            assert set(tensors) == {"mean", "logvar", "context", "pooled"}
            assert tensors["mean"].shape == tensors["logvar"].shape == (16, h // 8, w // 8)
            assert tensors["context"].shape == (77 + T5_LENGTH, 4096)
            assert tensors["pooled"].shape == (2048,)
            assert all(t.dtype == torch.bfloat16 for t in tensors.values())
            mean, logvar = vae.encode(image_to_tensor(img)[None])
            emb = text.encode([caption])
            for got, want in (
                (tensors["mean"], mean[0]),
                (tensors["logvar"], logvar[0]),
                (tensors["context"], emb.context[0]),
                (tensors["pooled"], emb.pooled[0]),
            ):
                torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
            seen_buckets.add(bucket)
            n += 1
    assert n == len(PHOTOS) + 1
    assert len(seen_buckets) == 3  # landscape, square and portrait all exercised


def test_stats_count_the_corrupt_image(cache, source):
    for name in source_names(source):
        stats = json.loads((cache / name.replace(".tar", ".stats.json")).read_text())
        if name == CORRUPT_SHARD:
            assert stats["corrupt_image"] == 1 and stats["good"] == 1
        else:
            assert stats["corrupt_image"] == 0 and stats["good"] >= 1
    assert "bad_0" not in read_cache(cache / CORRUPT_SHARD)


def test_cache_info_and_empty_prompt(cache, components):
    info = CacheInfo.load(cache)
    assert info.identity == conditioning_identity(
        str(components), {}, use_t5=True, t5_max_length=T5_LENGTH
    )
    assert info.layout.clip_length == 77 and info.layout.t5_length == T5_LENGTH
    assert info.dtype == "bfloat16"
    assert info.extra["data"] == {
        "resolution": 64,
        "bucket_multiple": 16,
        "max_aspect_ratio": 2.0,
        "crop": "center",
        "crop_seed": None,
        "caption": "txt",
        "empty_caption": "skip",
    }
    text = TextEncoders.from_pretrained(components, t5_max_length=T5_LENGTH)
    assert info.layout.clip_l_dim == text.clip_l.model.config.hidden_size
    assert info.layout.clip_g_dim == text.clip_g.model.config.hidden_size
    assert info.layout.pooled_l_dim == text.clip_l.model.config.projection_dim
    empty = decode_tensors((cache / EMPTY_PROMPT).read_bytes())
    assert empty["context"].shape == (77 + T5_LENGTH, 4096)
    assert empty["pooled"].shape == (2048,)
    assert empty["context"].dtype == torch.bfloat16
    want = text.encode([""])
    torch.testing.assert_close(empty["pooled"].float(), want.pooled[0], rtol=2**-7, atol=1e-3)


def test_rerun_skips_and_redoes_only_missing(cache, run_file, capsys):
    mtimes = {n: (cache / n).stat().st_mtime_ns for n in cache_names(cache)}
    capsys.readouterr()
    assert precompute(run_file, cache) == 0
    log = capsys.readouterr().out
    assert log.count("skipped (exists)") == len(mtimes)
    assert {n: (cache / n).stat().st_mtime_ns for n in cache_names(cache)} == mtimes

    victim = sorted(mtimes)[1]
    before = read_cache(cache / victim)
    (cache / victim).unlink()
    assert precompute(run_file, cache) == 0
    log = capsys.readouterr().out
    assert log.count("skipped (exists)") == len(mtimes) - 1
    after = {n: (cache / n).stat().st_mtime_ns for n in cache_names(cache)}
    assert set(after) == set(mtimes)
    assert {n: t for n, t in after.items() if n != victim} == {
        n: t for n, t in mtimes.items() if n != victim
    }
    assert {k: s["safetensors"] for k, s in read_cache(cache / victim).items()} == {
        k: s["safetensors"] for k, s in before.items()
    }


def test_rank_split_is_disjoint_and_complete(tmp_path, run_file, source):
    out = tmp_path / "split"
    assert precompute(run_file, out, "--rank", "0", "--world-size", "2") == 0
    rank0 = set(cache_names(out))
    assert (out / CACHE_INFO).is_file()
    assert precompute(run_file, out, "--rank", "1", "--world-size", "2") == 0
    rank1 = set(cache_names(out)) - rank0
    names = source_names(source)
    assert rank0 == set(names[0::2]) and rank1 == set(names[1::2])
    assert rank0.isdisjoint(rank1) and rank0 | rank1 == set(names)


def test_rank_from_environment(tmp_path, run_file, source, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    out = tmp_path / "env"
    assert precompute(run_file, out) == 0
    assert cache_names(out) == source_names(source)[1::3]
    assert not (out / CACHE_INFO).exists()  # only rank 0 writes the cache info


def test_other_encoder_settings_are_refused(cache, run_file, capsys):
    before = (cache / CACHE_INFO).read_text()
    capsys.readouterr()
    assert precompute(run_file, cache, "conditioning.t5_max_length=32") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "t5_max_length" in err and "another --out" in err
    assert (cache / CACHE_INFO).read_text() == before


def test_other_data_settings_are_refused(cache, run_file, capsys):
    before = (cache / CACHE_INFO).read_text()
    capsys.readouterr()
    for override, key in (
        ("data.crop=random", "data.crop"),
        ("data.resolution=128", "data.resolution"),
        ("data.caption=json:caption", "data.caption"),
    ):
        assert precompute(run_file, cache, override) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err and "another --out" in err
    assert (cache / CACHE_INFO).read_text() == before
    # the seed does not change centre crops: the cache is accepted (everything skipped)
    assert precompute(run_file, cache, "data.seed=5") == 0
    assert "skipped (exists)" in capsys.readouterr().out


def test_random_crops_are_seeded_and_reproducible(tmp_path, run_file, source):
    """data.crop=random: crops drawn from (data.seed, shard, sample index); a re-run split over
    two ranks writes byte-identical shards; another seed crops differently."""
    once, split, reseeded = tmp_path / "once", tmp_path / "split", tmp_path / "reseeded"
    assert precompute(run_file, once, "data.crop=random", "data.seed=3") == 0
    for rank in ("0", "1"):
        args = ("--rank", rank, "--world-size", "2")
        assert precompute(run_file, split, "data.crop=random", "data.seed=3", *args) == 0
    assert precompute(run_file, reseeded, "data.crop=random", "data.seed=4") == 0
    assert CacheInfo.load(once).extra["data"]["crop_seed"] == 3
    buckets = buckets_for(DataConfig(resolution=64))
    not_centred = 0
    differs_with_seed = 0
    for name in source_names(source):
        assert (once / name).read_bytes() == (split / name).read_bytes()
        cached = read_cache(once / name)
        other = read_cache(reseeded / name)
        for index, src in enumerate(iter_samples(str(source / name))):
            if src["__key__"] not in cached:
                continue
            image_bytes = next(src[e] for e in ("jpg", "png", "webp") if e in src)
            _, _, top_left, _ = decode_to_bucket(
                image_bytes, buckets, "random", crop_rng(3, name, index)
            )
            _, _, centre, _ = decode_to_bucket(image_bytes, buckets, "center")
            meta = json.loads(cached[src["__key__"]]["json"])
            assert meta["crop_top_left"] == list(top_left)
            not_centred += top_left != centre
            other_meta = json.loads(other[src["__key__"]]["json"])
            differs_with_seed += other_meta["crop_top_left"] != meta["crop_top_left"]
    assert not_centred >= 1 and differs_with_seed >= 1


def test_clear_errors(tmp_path, components, source, capsys):
    no_shards = write_run_file(tmp_path / "a.yaml", components, source)
    assert precompute(no_shards, tmp_path / "o1", "data.shards=") == 2
    assert "data.shards" in capsys.readouterr().err
    missing = write_run_file(tmp_path / "b.yaml", tmp_path / "nowhere", source)
    assert precompute(missing, tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "not found" in err and len(err.strip().splitlines()) == 1
    assert precompute(no_shards, tmp_path / "o3", "dta.shards=x") == 2
    assert "unknown section 'dta'" in capsys.readouterr().err
