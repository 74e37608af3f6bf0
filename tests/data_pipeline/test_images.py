"""decode_image / image_to_tensor on real images saved in the modes web shards contain."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image, ImageFile
from skimage import data as skdata

from data_pipeline.bad_samples import BadSample
from data_pipeline.images import (
    IMAGE_EXTENSIONS,
    decode_image,
    finish_image,
    image_to_tensor,
)
from tests.data_pipeline.image_bytes import encode, pixels


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())  # 512 x 512 RGB


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())  # 600 wide x 400 high RGB


@pytest.fixture(scope="module")
def camera() -> Image.Image:
    return Image.fromarray(skdata.camera())  # 512 x 512 L


def test_extensions():
    assert IMAGE_EXTENSIONS == ("jpg", "jpeg", "png", "webp")


def test_jpeg_rgb(coffee):
    img = decode_image(encode(coffee, "JPEG", quality=95), key="k")
    assert img.mode == "RGB" and img.size == (600, 400)
    assert np.abs(pixels(img) - pixels(coffee)).mean() < 4


def test_matplotlib_grace_hopper_jpeg():
    with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
        raw = f.read()
    img = decode_image(raw, key="hopper")
    assert img.mode == "RGB" and img.size == (512, 600)
    arr = pixels(img)
    assert 40 < arr.mean() < 200 and arr.std() > 20


def test_jpeg_grayscale(camera):
    img = decode_image(encode(camera, "JPEG", quality=95))
    assert img.mode == "RGB" and img.size == (512, 512)
    arr = pixels(img)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert np.abs(arr[..., 0] - pixels(camera)).mean() < 4


def test_jpeg_cmyk(coffee):
    raw = encode(coffee.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(raw)).mode == "CMYK"
    img = decode_image(raw)
    assert img.mode == "RGB" and img.size == (600, 400)
    # an inverted (Adobe) CMYK misread would give a photographic negative: diff ~ 100+
    assert np.abs(pixels(img) - pixels(coffee)).mean() < 8


def test_png_rgba_composited_on_white(astronaut):
    rgba = astronaut.convert("RGBA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[:, :256] = 0  # left half fully transparent
    alpha[:10, 300:310] = 128  # a half-transparent patch
    rgba.putalpha(Image.fromarray(alpha))
    img = decode_image(encode(rgba, "PNG"))
    arr, src = pixels(img), pixels(astronaut)
    assert img.mode == "RGB" and img.size == (512, 512)
    assert (arr[:, :256] == 255).all()  # white, not black
    assert (arr[20:, 256:] == src[20:, 256:]).all()  # opaque pixels untouched
    expected = (src[:10, 300:310] * 128 + 255 * 127) / 255
    assert np.abs(arr[:10, 300:310] - expected).max() <= 1.5


def test_png_la_composited_on_white(camera):
    la = camera.convert("LA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[:100] = 0
    la.putalpha(Image.fromarray(alpha))
    arr = pixels(decode_image(encode(la, "PNG")))
    assert (arr[:100] == 255).all()
    assert (arr[100:, :, 0] == pixels(camera)[100:]).all()


def test_png_palette_with_transparency():
    src = Image.fromarray(skdata.chelsea()).quantize(colors=64)
    idx = np.asarray(src)
    transparent = int(idx[0, 0])
    raw = encode(src, "PNG", transparency=transparent)
    assert Image.open(io.BytesIO(raw)).mode == "P"
    img = decode_image(raw)
    assert img.mode == "RGB" and img.size == (451, 300)
    arr = pixels(img)
    palette = np.asarray(src.convert("RGB")).astype(np.int32)
    mask = idx == transparent
    assert mask.sum() > 0 and (~mask).sum() > 0
    assert (arr[mask] == 255).all()
    assert (arr[~mask] == palette[~mask]).all()


def test_png_palette_opaque():
    src = Image.fromarray(skdata.chelsea()).quantize(colors=32)
    img = decode_image(encode(src, "PNG"))
    assert (pixels(img) == pixels(src.convert("RGB"))).all()


def test_png_16bit_grayscale_is_scaled_not_clipped(camera):
    cam = skdata.camera().astype(np.uint16)
    raw = encode(Image.fromarray(cam * 257), "PNG")
    assert Image.open(io.BytesIO(raw)).mode == "I;16"
    img = decode_image(raw)
    arr = pixels(img)
    assert img.mode == "RGB" and img.size == (512, 512)
    assert arr.max() == 255 and arr.min() == cam.min()
    assert (arr[..., 0] == cam).all()  # exact: (v * 257) / 257
    assert (arr == 255).mean() < 0.05  # a clip would saturate almost everything


def test_big_endian_16bit_is_scaled():
    cam = skdata.camera().astype(np.uint16)
    img = Image.frombytes("I;16B", (512, 512), (cam * 257).astype(">u2").tobytes())
    assert img.mode == "I;16B"
    arr = pixels(finish_image(img))
    assert (arr[..., 1] == cam).all()


def test_float_and_int32_images_are_scaled():
    ramp = np.linspace(0, 1, 256 * 16, dtype=np.float32).reshape(16, 256)
    arr = pixels(finish_image(Image.fromarray(ramp, mode="F")))
    assert arr.max() == 255 and arr.min() == 0 and abs(arr.mean() - 127.5) < 1
    big = (ramp * 65535).astype(np.int32)
    arr = pixels(finish_image(Image.fromarray(big, mode="I")))
    assert arr.max() == 255 and abs(arr.mean() - 127.5) < 1


def test_webp(astronaut):
    img = decode_image(encode(astronaut, "WEBP", lossless=True))
    assert img.mode == "RGB" and (pixels(img) == pixels(astronaut)).all()
    lossy = decode_image(encode(astronaut, "WEBP", quality=90))
    assert np.abs(pixels(lossy) - pixels(astronaut)).mean() < 6


def test_one_bit(camera):
    bw = camera.point(lambda v: 255 if v > 128 else 0).convert("1")
    raw = encode(bw, "PNG")
    assert Image.open(io.BytesIO(raw)).mode == "1"
    arr = pixels(decode_image(raw))
    assert set(np.unique(arr)) <= {0, 255}
    assert ((arr[..., 0] == 255) == (skdata.camera() > 128)).all()


@pytest.mark.parametrize(
    "orientation, transpose",
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
    ],
)
def test_exif_orientation(coffee, orientation, transpose):
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = encode(coffee, "JPEG", quality=95, exif=exif.tobytes())
    plain = decode_image(encode(coffee, "JPEG", quality=95))
    img = decode_image(raw)
    if orientation in (6, 8):
        assert img.size == (400, 600)  # width and height swapped
    else:
        assert img.size == (600, 400)
    assert np.abs(pixels(img) - pixels(plain.transpose(transpose))).mean() < 1


def test_mislabelled_format_still_decodes(astronaut):
    # a `.jpg` member holding a PNG: the bytes, not the extension, decide
    assert decode_image(encode(astronaut, "PNG")).size == (512, 512)


@pytest.mark.parametrize(
    "name, mangle",
    [
        ("cut_in_half", lambda raw: raw[: len(raw) // 2]),
        ("header_only", lambda raw: raw[:400]),
        ("random_bytes", lambda raw: random.Random(0).randbytes(len(raw))),
        ("empty", lambda raw: b""),
        ("text", lambda raw: b"<html>404 not found</html>"),
    ],
)
def test_corrupt_jpeg_is_bad_sample(astronaut, name, mangle):
    raw = encode(astronaut, "JPEG", quality=90)
    with pytest.raises(BadSample) as info:
        decode_image(mangle(raw), key=f"shard-0/{name}")
    assert info.value.reason == "corrupt_image"
    assert f"shard-0/{name}" in info.value.detail
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_bad_sample(astronaut):
    raw = encode(astronaut, "PNG")
    with pytest.raises(BadSample, match="corrupt_image") as info:
        decode_image(raw[: len(raw) * 3 // 4], key="cut-png")
    assert "cut-png" in info.value.detail


def test_unlisted_format_is_rejected(astronaut):
    with pytest.raises(BadSample) as info:
        decode_image(encode(astronaut, "TIFF"), key="tiff")
    assert info.value.reason == "corrupt_image"


@pytest.mark.parametrize("limit", [512 * 512 - 1, 1000])  # warning range, error range
def test_decompression_bomb_is_bad_sample(astronaut, monkeypatch, limit):
    raw = encode(astronaut, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(BadSample) as info:
        decode_image(raw, key="bomb")
    assert info.value.reason == "corrupt_image"
    assert "bomb" in info.value.detail and "decompression" in info.value.detail
    monkeypatch.undo()
    assert decode_image(raw).size == (512, 512)


def test_image_to_tensor(astronaut):
    t = image_to_tensor(astronaut)
    assert t.shape == (3, 512, 512) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.min() >= -1 and t.max() <= 1
    src = torch.from_numpy(np.asarray(astronaut).copy()).permute(2, 0, 1).float()
    assert torch.allclose(t, src / 127.5 - 1, atol=1e-6)


def test_image_to_tensor_channels_and_extremes():
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)
    t = image_to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 2, 3)
    assert t[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert t[:, 1, 2].tolist() == [-1.0, -1.0, -1.0]
    with pytest.raises(ValueError):
        image_to_tensor(Image.fromarray(arr).convert("L"))
