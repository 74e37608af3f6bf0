"""Image bytes in, 8-bit RGB out: robust decoding of what web-scale shards contain.

`decode_image` turns the bytes of a `jpg`/`jpeg`/`png`/`webp` member into an 8-bit RGB
`PIL.Image` whatever its storage mode (grayscale, palette, alpha, CMYK, 16-bit, 1-bit) and EXIF
orientation, with every failure reported as `BadSample("corrupt_image", ...)` so the pipeline
skips the sample instead of crashing. `image_to_tensor` turns the RGB image into the model's
(3, H, W) float32 input in [-1, 1].

The pixels are decoded eagerly (`img.load()`) with `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` left
False, so a truncated file fails here rather than silently training on a half-grey image.
PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is enforced as an error for this
call only; the global setting is never changed.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import (  # noqa: F401 - the plugins register the PIL_FORMATS decoders
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

from data_pipeline.bad_samples import BadSample

# Member extensions (WebDataset suffixes) that hold an image, in order of preference.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")

# PIL decoders that may be tried on member bytes. Restricting them keeps the attack surface
# (and the surprises) small: a `.jpg` member that is really a PNG still decodes, a TIFF/PSD/EPS
# does not. Multi-picture JPEGs from phones (MPO) open through the JPEG decoder; GIF and BMP
# are common mislabelled "jpg"s in web scrapes.
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

WHITE = (255, 255, 255)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ORIENTATION_TAG = 0x0112


def _fail(key: str, reason: str) -> BadSample:
    return BadSample("corrupt_image", f"{key}: {reason}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def open_image(data: bytes, *, key: str = "") -> Image.Image:
    """Parse the header only (lazy PIL image; pixels not decoded yet). Raises BadSample.

    Use `finish_image` on the result (optionally after `img.draft(...)` for a JPEG) to get
    the decoded RGB image; `decode_image` does both."""
    if not data:
        raise _fail(key, "empty image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(key, f"decompression bomb ({_short(exc)})") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise _fail(key, _short(exc)) from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise _fail(key, f"empty image size {w}x{h}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:  # belt and braces: the warning may be filtered
        raise _fail(key, f"decompression bomb ({w}x{h} pixels > MAX_IMAGE_PIXELS={limit})")
    return img


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image; 1 when absent or unreadable."""
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not cost an otherwise good image
        return 1
    return value if 1 <= value <= 8 else 1


def _high_bit_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float single-channel image -> 8-bit "L", scaled, never clipped.

    The range is inferred from the mode and the values: I;16* is 0..65535 (divide by 257, so
    65535 -> 255 exactly); "I"/"F" whose values fit 0..255 are taken as 8-bit, "F" within
    0..1 as normalised, values up to 65535 as 16-bit, anything larger is scaled by its max.
    Negative values clamp to 0."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        full = 65535.0
    else:
        arr = arr.astype(np.float64, copy=False)
        finite = arr[np.isfinite(arr)]
        peak = float(finite.max()) if finite.size else 0.0
        if img.mode == "F" and peak <= 1.0:
            full = 1.0
        elif peak <= 255.0:
            full = 255.0
        elif peak <= 65535.0:
            full = 65535.0
        else:
            full = peak
    scaled = np.nan_to_num(arr.astype(np.float32) * np.float32(255.0 / full), nan=0.0)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _HIGH_BIT_MODES:
        return _high_bit_to_8bit(img).convert("RGB")
    if mode in _ALPHA_MODES or img.has_transparency_data:
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    # L, 1, P (opaque), CMYK (PIL undoes Adobe's inverted CMYK itself), YCbCr, LAB, HSV, ...
    return img.convert("RGB")


def finish_image(img: Image.Image, *, key: str = "") -> Image.Image:
    """Decode the pixels of an `open_image` result, apply EXIF orientation, convert to RGB."""
    try:
        orientation = exif_orientation(img)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        if orientation != 1:
            img = _apply_orientation(img, orientation)
        rgb = _to_rgb(img)
    except BadSample:
        raise
    except Exception as exc:
        raise _fail(key, _short(exc)) from exc
    if rgb.mode != "RGB":  # pragma: no cover - defensive: every branch above yields RGB
        raise _fail(key, f"could not convert mode {img.mode} to RGB")
    return rgb


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    """`ImageOps.exif_transpose`; if rewriting a malformed EXIF block fails, transpose anyway."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        method = _TRANSPOSE.get(orientation)
        return img.transpose(method) if method is not None else img


def decode_image(data: bytes, *, key: str = "") -> Image.Image:
    """Decode image bytes to a fully loaded 8-bit RGB `PIL.Image`.

    Handles grayscale (L), 1-bit, palette (P, with or without transparency), LA/RGBA/PA
    alpha, CMYK (including Adobe's inverted CMYK JPEGs, which PIL undoes), YCbCr, and 16/32-bit
    integer or float images (I;16, I;16B, I, F), which are *scaled* to 8 bit (65535 -> 255),
    never clipped. Transparent pixels are composited onto WHITE, the usual background for web
    images (a transparent logo on black would become a black square). The EXIF orientation is
    applied (`ImageOps.exif_transpose` semantics), so orientation 6 swaps width and height.

    Any failure (unknown format, truncated or corrupt data, decompression bomb above
    `PIL.Image.MAX_IMAGE_PIXELS`) raises `BadSample("corrupt_image", f"{key}: {reason}")`.
    """
    return finish_image(open_image(data, key=key), key=key)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float32 tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    if img.mode != "RGB":
        raise ValueError(f"image_to_tensor needs an RGB image (use decode_image); got {img.mode}")
    arr = np.array(img, dtype=np.uint8, copy=True)  # (H, W, 3), writable
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return t.to(torch.float32).div_(127.5).sub_(1.0)
