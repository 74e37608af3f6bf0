"""SD3/SDXL-style aspect-ratio buckets: which (height, width) an image trains at, and getting it
there (resize to cover, crop, record the crop and the original size for conditioning).

Bucket rule (`make_buckets`): the target area is A = resolution**2. For every short side
s = multiple, 2*multiple, ..., resolution, the long side l is the multiple of `multiple` nearest
to A / s (ties round down), and both (s, l) (landscape) and (l, s) (portrait) are buckets if
l / s <= max_aspect_ratio. Hence:

- every side is a multiple of `multiple` (16 = VAE factor 8 x patch 2);
- the area of every bucket is within +-multiple / (2 * resolution) of A (+-3.1% at 256,
  +-1.6% at 512, +-0.8% at 1024): a bucket never costs noticeably more memory than the square;
- the set is symmetric under transposition (portraits are treated like landscapes), and the
  square (resolution, resolution) is always included;
- the list is sorted by (height, width), i.e. from the widest landscape to the tallest portrait,
  without duplicates.

Several resolutions in one run (`data.resolutions`, e.g. [512, 1024]): each resolution is a
*family* of buckets made by the rule above. An image of w x h pixels goes to the family of the
largest resolution r with w * h >= r**2 (it covers that area, so it is never upscaled to reach
it), otherwise to the smallest family; within the family, the bucket of the nearest aspect
ratio (`assign_bucket`). A micro batch holds one bucket, and holds
`micro_batch_for(r, micro_batch_size, base)` samples: micro_batch_size x (base / r)**2 rounded
down (at least 1), base = the smallest resolution, so every micro batch carries about the same
number of image tokens whatever its family.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.bad_samples import BadSample
from data_pipeline.images import exif_orientation, finish_image, open_image

Bucket = tuple[int, int]  # (height, width)

# How the resize to cover is done (both antialiased when downscaling):
# - "torch": bicubic with antialias=True on the uint8 image (torch's AVX2 uint8 kernel, built
#   to match PIL's BICUBIC to within 1 level), about 3x faster than PIL's LANCZOS on one core
#   and what makes >= 100 images/s per core at 512 px possible. The default, for RGB images.
# - "pil": PIL LANCZOS with reducing_gap (PIL first shrinks big images by an integer factor with
#   a box filter, `Image.reduce`, then finishes with LANCZOS from >= REDUCING_GAP times the target
#   size; Pillow documents this as indistinguishable in most cases). Used for non-RGB images.
RESIZE_BACKEND: Literal["torch", "pil"] = "torch"
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0


def make_buckets(
    resolution: int, multiple: int = 16, max_aspect_ratio: float = 2.0
) -> list[Bucket]:
    """Aspect-ratio buckets (height, width) at target area resolution**2 (rule in the module
    docstring)."""
    if multiple <= 0 or resolution <= 0 or resolution % multiple:
        raise ValueError(
            f"resolution={resolution} must be a positive multiple of multiple={multiple}"
        )
    if max_aspect_ratio < 1.0:
        raise ValueError(f"max_aspect_ratio={max_aspect_ratio} must be >= 1.0")
    area = resolution * resolution
    buckets: set[Bucket] = {(resolution, resolution)}
    for short in range(multiple, resolution + 1, multiple):
        # nearest multiple of `multiple` to area / short, exact integer arithmetic, ties down
        q, r = divmod(area, short * multiple)
        n = q + 1 if 2 * r > short * multiple else q
        long = max(n * multiple, short)
        if long > max_aspect_ratio * short * (1 + 1e-9):
            continue
        buckets.add((short, long))
        buckets.add((long, short))
    return sorted(buckets)


def buckets_for(config) -> list[Bucket]:
    """Buckets of a `DataConfig` (resolution(s), bucket_multiple, max_aspect_ratio): with
    several resolutions, those of every family, sorted and without duplicates."""
    return bucket_families(config).all_buckets()


@dataclass(frozen=True)
class BucketFamilies:
    """One bucket family per resolution, smallest resolution first (module docstring)."""

    families: tuple[tuple[int, tuple[Bucket, ...]], ...]

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(r for r, _ in self.families)

    def all_buckets(self) -> list[Bucket]:
        return sorted({b for _, family in self.families for b in family})

    def family(self, width: int, height: int) -> tuple[int, tuple[Bucket, ...]]:
        """The family of the largest resolution whose area the image covers, else the
        smallest."""
        chosen = self.families[0]
        for resolution, buckets in self.families:
            if width * height >= resolution * resolution:
                chosen = (resolution, buckets)
        return chosen

    def assign(self, width: int, height: int) -> Bucket:
        return assign_bucket(width, height, self.family(width, height)[1])

    def resolution_of(self, bucket: Bucket) -> int | None:
        """The family a bucket belongs to (the smallest if several hold it); None if none."""
        for resolution, buckets in self.families:
            if tuple(bucket) in buckets:
                return resolution
        return None


def bucket_families(config) -> BucketFamilies:
    """The families of a `DataConfig`: data.resolutions, or the one data.resolution."""
    resolutions = sorted(set(getattr(config, "resolutions", ()) or (config.resolution,)))
    return BucketFamilies(
        tuple(
            (r, tuple(make_buckets(r, config.bucket_multiple, config.max_aspect_ratio)))
            for r in resolutions
        )
    )


def micro_batch_for(resolution: int, micro_batch_size: int, base_resolution: int) -> int:
    """Samples per micro batch at `resolution`: micro_batch_size at base_resolution, scaled by
    the inverse pixel area so the image tokens per micro batch stay about the same; rounded
    down, at least 1."""
    return max(1, micro_batch_size * base_resolution**2 // resolution**2)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to width/height in log space.

    Ties (within 1e-9 in log aspect) go to the squarer bucket, then to the smaller
    (height, width); the result depends only on the inputs."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets")
    target = math.log(width / height)

    def key(bucket: Bucket) -> tuple[float, float, Bucket]:
        aspect = math.log(bucket[1] / bucket[0])
        return (round(abs(aspect - target), 9), round(abs(aspect), 9), bucket)

    return min(buckets, key=key)


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """(width, height) of the image resized to cover `bucket` with its aspect ratio kept:
    scale = max(bw / width, bh / height); one side equals the bucket's exactly."""
    bh, bw = bucket
    if bw * height >= bh * width:  # bw/width >= bh/height: width is the binding side
        return bw, max(bh, round(height * bw / width))
    return max(bw, round(width * bh / height)), bh


def crop_offsets(
    resized: tuple[int, int],
    bucket: Bucket,
    crop: Literal["center", "random"] = "center",
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """(top, left) of the bucket-size crop in the resized (width, height) image."""
    rw, rh = resized
    bh, bw = bucket
    extra_x, extra_y = rw - bw, rh - bh
    if extra_x < 0 or extra_y < 0:
        raise ValueError(f"resized size {rw}x{rh} does not cover bucket {bw}x{bh}")
    if crop == "center":
        return extra_y // 2, extra_x // 2
    if crop == "random":
        r = rng if rng is not None else random
        return r.randint(0, extra_y), r.randint(0, extra_x)
    raise ValueError(f"crop={crop!r} must be 'center' or 'random'")


def _check_size(width: int, height: int, min_side: int, key: str) -> None:
    if width < min_side or height < min_side:
        raise BadSample("too_small", f"{key}: {width}x{height} has a side < {min_side}")


def _resize_crop_box(
    img: Image.Image,
    original: tuple[int, int],
    bucket: Bucket,
    crop: Literal["center", "random"],
    rng: random.Random | None,
    source_scale: float = 1.0,
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize-to-cover then crop.

    `original` is the (width, height) the geometry is defined on; `img` may be a JPEG draft
    of it, `source_scale` = img pixels per original pixel (1, 1/2, 1/4, 1/8)."""
    w, h = original
    bh, bw = bucket
    rw, rh = cover_size(w, h, bucket)
    top, left = crop_offsets((rw, rh), bucket, crop, rng)
    if img.size == (rw, rh):
        out = img if (rw, rh) == (bw, bh) else img.crop((left, top, left + bw, top + bh))
    elif RESIZE_BACKEND == "torch" and img.mode == "RGB":
        arr = np.array(img, dtype=np.uint8, copy=True)  # (H, W, 3)
        if source_scale != 1.0:  # a draft's last row/column may be a partial block: drop it
            arr = arr[: max(1, round(h * source_scale)), : max(1, round(w * source_scale))]
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # channels-last memory
        y = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
        y = y[0, :, top : top + bh, left : left + bw].permute(1, 2, 0)
        out = Image.fromarray(np.ascontiguousarray(y.numpy()), mode="RGB")
    else:
        # PIL's resize(box=...) resamples only the kept region and takes the filter support
        # from outside the box, so this equals resizing the whole image and cropping.
        sx = w * source_scale / rw  # source pixels per resized pixel
        sy = h * source_scale / rh
        box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
        out = img.resize((bw, bh), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    return out, (top, left)


def resize_and_crop(
    img: Image.Image,
    bucket: Bucket,
    crop: Literal["center", "random"] = "center",
    rng: random.Random | None = None,
    *,
    min_side: int = 16,
    key: str = "",
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize `img` to cover `bucket` (scale = max(bw/w, bh/h), aspect kept), then crop to it.

    Returns (image of exactly bw x bh, crop_top_left = (top, left), original_size = (height,
    width)). The crop coordinates are in the RESIZED image's pixels, as in SDXL's crop
    conditioning; "center" crops floor-centred, "random" draws top and left uniformly with
    `rng` (reproducible for a seeded `random.Random`; the `random` module when None).
    An image with a side < `min_side` raises BadSample("too_small")."""
    w, h = img.size
    _check_size(w, h, min_side, key)
    out, top_left = _resize_crop_box(img, (w, h), bucket, crop, rng)
    return out, top_left, (h, w)


def decode_to_bucket(
    data: bytes,
    buckets: Sequence[Bucket] | BucketFamilies,
    crop: Literal["center", "random"] = "center",
    rng: random.Random | None = None,
    *,
    min_side: int = 16,
    key: str = "",
) -> tuple[Image.Image, Bucket, tuple[int, int], tuple[int, int]]:
    """Image bytes -> (bucket-size RGB image, bucket, crop_top_left, original_size).

    Same result as `decode_image` + `assign_bucket` + `resize_and_crop`, but faster for large
    JPEGs: the bucket is chosen from the header, and when the cover size is at most half the
    stored size the JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT (`Image.draft`), never
    below the cover size, before the final antialiased resize. original_size is the full
    (EXIF-rotated) size. `buckets` is one family's list or a `BucketFamilies` (the family is
    chosen by the image's area). Raises BadSample("corrupt_image" | "too_small")."""
    img = open_image(data, key=key)
    orientation = exif_orientation(img)
    sw, sh = img.size  # stored (pre-rotation) size
    w, h = (sh, sw) if orientation in (5, 6, 7, 8) else (sw, sh)
    _check_size(w, h, min_side, key)
    if isinstance(buckets, BucketFamilies):
        bucket = buckets.assign(w, h)
    else:
        bucket = assign_bucket(w, h, buckets)
    rw, rh = cover_size(w, h, bucket)
    source_scale = 1.0
    if img.format in ("JPEG", "MPO") and 2 * rw <= w and 2 * rh <= h:
        need = (rh, rw) if orientation in (5, 6, 7, 8) else (rw, rh)
        try:
            drafted = img.draft(None, need)
        except Exception:
            drafted = None
        if drafted is not None:
            source_scale = drafted[1][2] / sw  # 1, 1/2, 1/4 or 1/8
    rgb = finish_image(img, key=key)
    out, top_left = _resize_crop_box(rgb, (w, h), bucket, crop, rng, source_scale)
    return out, bucket, top_left, (h, w)
