"""Aspect-ratio buckets: the bucket lists, bucket assignment, resize-to-cover and crop geometry."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import data_pipeline.buckets as buckets_mod
from data_pipeline.bad_samples import BadSample
from data_pipeline.buckets import (
    assign_bucket,
    cover_size,
    decode_to_bucket,
    make_buckets,
    resize_and_crop,
)
from data_pipeline.config import DataConfig
from data_pipeline.images import decode_image
from tests.data_pipeline.image_bytes import encode, pixels


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())  # 600 wide x 400 high


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_bucket_lists(resolution):
    buckets = make_buckets(resolution)
    area = resolution**2
    assert (resolution, resolution) in buckets
    assert len(buckets) == len(set(buckets)) >= 9
    assert buckets == sorted(buckets)
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert 0.5 <= w / h <= 2.0
        assert abs(h * w - area) <= area * 0.10
        assert abs(h * w - area) <= min(h, w) * 16 / 2  # nearest multiple of 16
        assert (w, h) in buckets  # portraits mirror landscapes
    # the extremes reach well towards the 2:1 bound
    widest = max(w / h for h, w in buckets)
    assert widest >= (1.7 if resolution == 256 else 1.9)


def test_bucket_rule_parameters():
    assert make_buckets(512, max_aspect_ratio=1.0) == [(512, 512)]
    narrow = make_buckets(512, max_aspect_ratio=1.25)
    assert max(w / h for h, w in narrow) <= 1.25 and len(narrow) > 1
    coarse = make_buckets(512, multiple=64)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in coarse)
    assert make_buckets(512) == make_buckets(512)  # deterministic
    cfg = DataConfig(resolution=512)
    assert buckets_mod.buckets_for(cfg) == make_buckets(512, 16, 2.0)
    with pytest.raises(ValueError):
        make_buckets(500)
    with pytest.raises(ValueError):
        make_buckets(512, max_aspect_ratio=0.5)


def test_known_buckets_at_256():
    assert make_buckets(256) == [
        (192, 336),
        (208, 320),
        (224, 288),
        (240, 272),
        (256, 256),
        (272, 240),
        (288, 224),
        (320, 208),
        (336, 192),
    ]


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_assign_bucket_known_aspects(resolution):
    buckets = make_buckets(resolution)
    assert assign_bucket(777, 777, buckets) == (resolution, resolution)
    widest = max(buckets, key=lambda b: b[1] / b[0])
    tallest = max(buckets, key=lambda b: b[0] / b[1])
    assert assign_bucket(2000, 1000, buckets) == widest
    assert assign_bucket(5000, 100, buckets) == widest
    assert assign_bucket(1000, 2000, buckets) == tallest
    bh, bw = assign_bucket(768, 1024, buckets)  # 3:4 portrait
    assert bh > bw and abs(math.log((bw / bh) / 0.75)) < 0.05
    bh, bw = assign_bucket(1024, 768, buckets)
    assert bw > bh and abs(math.log((bw / bh) / (4 / 3))) < 0.05
    # closest in log space: no other bucket is strictly closer
    for w, h in [(1024, 768), (1920, 1080), (600, 400), (451, 300), (333, 500)]:
        got = assign_bucket(w, h, buckets)
        dist = abs(math.log(got[1] / got[0]) - math.log(w / h))
        assert all(dist <= abs(math.log(b[1] / b[0]) - math.log(w / h)) + 1e-12 for b in buckets)


def test_assign_bucket_ties():
    # 2:1 image is exactly as far (log 2) from 4:1 as from 1:1 -> the squarer one
    buckets = [(16, 64), (32, 32)]
    assert assign_bucket(200, 100, buckets) == (32, 32)
    assert assign_bucket(200, 100, buckets[::-1]) == (32, 32)
    # equally far and equally square: the smaller (height, width), whatever the order
    assert assign_bucket(100, 100, [(32, 16), (16, 32)]) == (16, 32)
    assert assign_bucket(100, 100, [(16, 32), (32, 16)]) == (16, 32)
    with pytest.raises(ValueError):
        assign_bucket(0, 10, buckets)


def test_cover_size():
    assert cover_size(600, 400, (256, 256)) == (384, 256)
    assert cover_size(400, 600, (256, 256)) == (256, 384)
    assert cover_size(640, 480, (448, 592)) == (597, 448)  # 640 * 448 / 480 = 597.3
    assert cover_size(1000, 500, (368, 720)) == (736, 368)
    assert cover_size(20, 20, (256, 256)) == (256, 256)  # upscale


def reference_resize_crop(img, bucket, top, left):
    """The definition: LANCZOS-resize the whole image to cover, then crop."""
    bh, bw = bucket
    rw, rh = cover_size(img.width, img.height, bucket)
    return img.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + bw, top + bh))


@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_center_crop_geometry_by_hand(coffee, monkeypatch, backend):
    monkeypatch.setattr(buckets_mod, "RESIZE_BACKEND", backend)
    # 600x400 -> cover 256x256: scale 0.64 -> 384x256, left = (384 - 256) // 2 = 64
    out, top_left, original = resize_and_crop(coffee, (256, 256), "center")
    assert out.size == (256, 256) and out.mode == "RGB"
    assert top_left == (0, 64)
    assert original == (400, 600)
    ref = reference_resize_crop(coffee, (256, 256), 0, 64)
    assert np.abs(pixels(out) - pixels(ref)).mean() < 2.0
    shifted = reference_resize_crop(coffee, (256, 256), 0, 0)
    assert np.abs(pixels(out) - pixels(shifted)).mean() > 5.0  # the comparison can tell
    # portrait: 400x600 -> (256, 256): 256x384, top = 64
    out, top_left, original = resize_and_crop(
        coffee.transpose(Image.Transpose.ROTATE_90), (256, 256)
    )
    assert out.size == (256, 256) and top_left == (64, 0) and original == (600, 400)
    # 640x480 into (448, 592): 597x448, left = (597 - 592) // 2 = 2
    img = coffee.resize((640, 480))
    out, top_left, original = resize_and_crop(img, (448, 592), "center")
    assert out.size == (592, 448) and top_left == (0, 2) and original == (480, 640)
    ref = reference_resize_crop(img, (448, 592), 0, 2)
    assert np.abs(pixels(out) - pixels(ref)).mean() < 2.0


def test_exact_size_is_untouched(coffee):
    img = coffee.crop((0, 0, 592, 400)).resize((592, 448))
    out, top_left, original = resize_and_crop(img, (448, 592))
    assert top_left == (0, 0) and original == (448, 592)
    assert (pixels(out) == pixels(img)).all()


@pytest.mark.parametrize("resolution", [256, 512])
def test_every_bucket_gets_its_exact_size(coffee, resolution):
    for bucket in make_buckets(resolution):
        for crop in ("center", "random"):
            out, (top, left), original = resize_and_crop(coffee, bucket, crop, random.Random(1))
            bh, bw = bucket
            rw, rh = cover_size(600, 400, bucket)
            assert out.size == (bw, bh)
            assert 0 <= top <= rh - bh and 0 <= left <= rw - bw
            assert original == (400, 600)


def test_random_crop_reproducible_and_in_bounds(coffee):
    bucket = (256, 256)  # cover 384x256: left in [0, 128], top always 0
    runs = [resize_and_crop(coffee, bucket, "random", random.Random(1234)) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    assert (pixels(runs[0][0]) == pixels(runs[1][0])).all()
    lefts = set()
    for seed in range(40):
        out, (top, left), _ = resize_and_crop(coffee, bucket, "random", random.Random(seed))
        assert top == 0 and 0 <= left <= 128
        lefts.add(left)
    assert len(lefts) > 10
    out, (top, left), _ = resize_and_crop(coffee, bucket, "random", random.Random(7))
    ref = reference_resize_crop(coffee, bucket, top, left)
    assert np.abs(pixels(out) - pixels(ref)).mean() < 2.0
    # crop_offsets draws both offsets when both sides have slack
    offsets = [
        buckets_mod.crop_offsets((300, 280), (256, 256), "random", random.Random(s))
        for s in range(20)
    ]
    assert all(0 <= top <= 24 and 0 <= left <= 44 for top, left in offsets)
    assert len({t for t, _ in offsets}) > 3 and len({left for _, left in offsets}) > 3
    with pytest.raises(ValueError):
        resize_and_crop(coffee, bucket, "middle")


def test_too_small():
    tiny = Image.new("RGB", (10, 300), (1, 2, 3))
    with pytest.raises(BadSample) as info:
        resize_and_crop(tiny, (256, 256), key="tiny")
    assert info.value.reason == "too_small" and "tiny" in info.value.detail
    with pytest.raises(BadSample, match="too_small"):
        resize_and_crop(Image.new("RGB", (100, 100)), (256, 256), min_side=128)
    small = Image.new("RGB", (20, 20), (10, 200, 30))
    out, top_left, original = resize_and_crop(small, (256, 256))  # upscaling is allowed
    assert out.size == (256, 256) and top_left == (0, 0) and original == (20, 20)
    assert np.abs(pixels(out) - np.array([10, 200, 30])).max() <= 2


def test_decode_to_bucket_matches_decode_then_resize(coffee):
    buckets = make_buckets(512)
    raw = encode(coffee, quality=95)
    out, bucket, top_left, original = decode_to_bucket(raw, buckets, key="a")
    ref, ref_top_left, ref_original = resize_and_crop(
        decode_image(raw), assign_bucket(600, 400, buckets)
    )
    assert bucket == assign_bucket(600, 400, buckets) and original == (400, 600) == ref_original
    assert top_left == ref_top_left
    assert (pixels(out) == pixels(ref)).all()


def test_decode_to_bucket_draft_path_for_big_jpeg(coffee):
    big = coffee.resize((2400, 1600), Image.Resampling.BICUBIC)  # cover at 256: 384x256 (1/4)
    raw = encode(big, quality=95)
    buckets = make_buckets(256)
    out, bucket, top_left, original = decode_to_bucket(raw, buckets, key="big")
    assert original == (1600, 2400) and bucket == assign_bucket(2400, 1600, buckets)
    ref, ref_top_left, _ = resize_and_crop(decode_image(raw), bucket)
    assert top_left == ref_top_left and out.size == ref.size
    assert np.abs(pixels(out) - pixels(ref)).mean() < 3.0


def test_decode_to_bucket_exif_rotated(coffee):
    exif = Image.Exif()
    exif[0x0112] = 6
    big = coffee.resize((1200, 800))
    raw = encode(big, quality=95, exif=exif.tobytes())
    buckets = make_buckets(256)
    out, bucket, top_left, original = decode_to_bucket(raw, buckets, "random", random.Random(0))
    assert original == (1200, 800)  # (height, width) after rotation: portrait
    assert bucket[0] > bucket[1] and out.size == (bucket[1], bucket[0])
    ref, ref_top_left, _ = resize_and_crop(decode_image(raw), bucket, "random", random.Random(0))
    assert top_left == ref_top_left
    assert np.abs(pixels(out) - pixels(ref)).mean() < 3.0


def test_decode_to_bucket_bad_samples():
    buckets = make_buckets(256)
    with pytest.raises(BadSample, match="corrupt_image"):
        decode_to_bucket(b"not an image", buckets, key="x")
    with pytest.raises(BadSample, match="too_small"):
        decode_to_bucket(encode(Image.new("RGB", (8, 64))), buckets, key="y")
