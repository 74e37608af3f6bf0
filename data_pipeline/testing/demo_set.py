"""`mmdit-demo-data`: a small real image-caption set built from images that ship with packages.

`make demo` has to pretrain something recognisable on a laptop with no downloads, so this
builds its training data from what is already installed:

- the 1,797 scikit-learn handwritten digits (8x8, 17 grey levels), drawn as dark ink on white
  paper and upsampled (bicubic) to ``--size`` px, captioned "a handwritten digit seven" (one in
  five uses another phrasing, deterministically, so the text encoders see some variety);
- the bundled scikit-image sample photos and matplotlib's sample images, each with a
  hand-written caption, centre-cropped to a square and resized to ``--size``; every photo gives
  ``VIEWS_PER_PHOTO`` fixed crops/flips (same caption) so photos are not single samples.

Output (``--out DIR``)::

    DIR/train/NAME.png + NAME.txt   image and its caption (same stem), what mmdit-shards reads
    DIR/val/NAME.png + NAME.txt     held-out split, same layout
    DIR/README.txt                  what is where, sources and licences
    DIR/summary.json                counts per source and split, settings

Names are ``digit_00042`` (index in ``load_digits``) and ``photo_<name>_<view>``. The split is a
seeded permutation per source, so the same ``--seed``/``--val-fraction`` give the same files.
``DIR`` is built in a temporary sibling and renamed into place: an existing non-empty ``DIR``
is refused unless ``--overwrite``, which replaces it wholesale.

One module of ~590 lines rather than several: a quarter of it is the table of bundled photos and
their captions (``PHOTOS``), and the rest (digits, photo crops, split, write) is one short
pipeline behind one command that nothing else builds on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmdit.atomic_file import atomic_directory, write_atomic

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The main form (what the demo samples with) and the occasional alternatives. {word} is the
# digit's name, {n} its numeral.
DIGIT_CAPTION = "a handwritten digit {word}"
DIGIT_CAPTION_VARIANTS = ("the digit {n} written by hand", "a handwritten number {word}")
DIGIT_VARIANT_EVERY = 5  # every 5th digit (index % 5 == 4) uses a variant

VIEWS_PER_PHOTO = 8
# (square side as a fraction of the shorter image side, x position, y position, mirror):
# positions are fractions of the free range (0.5 = centred). Eight distinct crops, so photos
# that must not be mirrored (text) still give eight different views.
PHOTO_VIEWS: tuple[tuple[float, float, float, bool], ...] = (
    (1.0, 0.5, 0.5, False),
    (0.9, 0.5, 0.5, True),
    (0.8, 0.0, 0.0, False),
    (0.8, 1.0, 0.0, True),
    (0.8, 0.0, 1.0, False),
    (0.8, 1.0, 1.0, True),
    (0.65, 0.5, 0.5, False),
    (0.5, 0.5, 0.5, True),
)

SOURCES = ("sklearn_digits", "skimage", "matplotlib")
MIN_SIZE, MAX_SIZE = 8, 512
DIGITS_LICENCE = (
    "scikit-learn's copy of the UCI 'Optical Recognition of Handwritten Digits' test set "
    "(Alpaydin & Kaynak, 1998; UCI ML Repository, CC BY 4.0)"
)


@dataclass(frozen=True)
class PhotoSpec:
    """One bundled photo: where it comes from, its caption and its licence note."""

    name: str  # safe: lowercase letters, digits, underscores
    source: str  # "skimage" (skimage.data.<loader>) or "matplotlib" (sample_data/<loader>)
    loader: str
    caption: str
    licence: str
    mirror: bool = True  # False for text, which reads wrong mirrored


PHOTOS: tuple[PhotoSpec, ...] = (
    PhotoSpec(
        "astronaut",
        "skimage",
        "astronaut",
        "a photo of an astronaut in an orange spacesuit",
        "NASA, public domain",
    ),
    PhotoSpec("coffee", "skimage", "coffee", "a cup of coffee on a saucer", "CC0, Rachel Michetti"),
    PhotoSpec("chelsea", "skimage", "chelsea", "a tabby cat", "CC0, Stefan van der Walt"),
    PhotoSpec(
        "rocket",
        "skimage",
        "rocket",
        "a rocket on a launch pad at night",
        "SpaceX, public domain",
    ),
    PhotoSpec(
        "camera",
        "skimage",
        "camera",
        "a black and white photo of a man with a camera on a tripod",
        "CC0, Lav Varshney",
    ),
    PhotoSpec(
        "coins",
        "skimage",
        "coins",
        "a black and white photo of old coins in rows",
        "Brooklyn Museum, no known copyright restrictions",
    ),
    PhotoSpec(
        "horse",
        "skimage",
        "horse",
        "a black silhouette of a horse on a white background",
        "openclipart, CC0, Andreas Preuss",
    ),
    PhotoSpec(
        "moon",
        "skimage",
        "moon",
        "a gray photo of the surface of the moon",
        "scikit-image sample data",
    ),
    PhotoSpec(
        "page",
        "skimage",
        "page",
        "a scanned page of printed text",
        "scikit-image sample data",
        mirror=False,
    ),
    PhotoSpec(
        "clock",
        "skimage",
        "clock",
        "a blurry black and white photo of a wall clock",
        "public domain, Stefan van der Walt",
    ),
    PhotoSpec("brick", "skimage", "brick", "a gray brick wall", "CC0Textures, CC0"),
    PhotoSpec("grass", "skimage", "grass", "a black and white photo of grass", "DeviantArt, CC0"),
    PhotoSpec(
        "gravel", "skimage", "gravel", "a black and white photo of gravel", "CC0Textures, CC0"
    ),
    PhotoSpec(
        "hubble_deep_field",
        "skimage",
        "hubble_deep_field",
        "a telescope image of distant galaxies in deep space",
        "NASA, public domain",
    ),
    PhotoSpec(
        "tissue",
        "skimage",
        "immunohistochemistry",
        "a microscope image of stained tissue",
        "CMMI, no known copyright restrictions",
    ),
    PhotoSpec(
        "retina",
        "skimage",
        "retina",
        "a photo of the retina of a human eye",
        "Mikael Haggstrom, CC0",
    ),
    PhotoSpec(
        "color_wheel",
        "skimage",
        "colorwheel",
        "a color wheel on a black background",
        "scikit-image sample data",
    ),
    PhotoSpec(
        "skimage_logo",
        "skimage",
        "logo",
        "a green and orange logo with a snake",
        "scikit-image logo (BSD-3-Clause project)",
    ),
    PhotoSpec(
        "equations",
        "skimage",
        "text",
        "a photo of math written on paper",
        "Wikipedia, public domain",
        mirror=False,
    ),
    PhotoSpec(
        "cell",
        "skimage",
        "cell",
        "a gray microscope image of a single cell",
        "CC0, Paul Mueller",
    ),
    PhotoSpec(
        "blood_vessels",
        "skimage",
        "microaneurysms",
        "a gray close-up of blood vessels in an eye",
        "HRF database, CC0, Andreas Maier",
    ),
    PhotoSpec(
        "motorcycle",
        "skimage",
        "stereo_motorcycle",
        "a red motorcycle parked in a garage",
        "Middlebury 2014 stereo data set (Scharstein et al., GCPR 2014)",
    ),
    PhotoSpec(
        "grace_hopper",
        "matplotlib",
        "grace_hopper.jpg",
        "a portrait photo of a woman in a navy uniform",
        "US Navy photo of Grace Hopper, public domain",
    ),
    PhotoSpec(
        "gift_box",
        "matplotlib",
        "Minduka_Present_Blue_Pack.png",
        "a blue gift box with a silver ribbon",
        "openclipart (Minduka), public domain",
    ),
)


@dataclass(frozen=True)
class Sample:
    """One output image: safe file stem, source, caption and a function drawing it."""

    name: str
    source: str
    caption: str
    render: Callable[[], Image.Image]


# ---------------------------------------------------------------------------------------------
# digits


def digit_caption(index: int, label: int) -> str:
    """The caption of digit `index`: the main form, or (every 5th) a fixed variant."""
    word = DIGIT_WORDS[label]
    if index % DIGIT_VARIANT_EVERY != DIGIT_VARIANT_EVERY - 1:
        return DIGIT_CAPTION.format(word=word, n=label)
    variant = DIGIT_CAPTION_VARIANTS[(index // DIGIT_VARIANT_EVERY) % len(DIGIT_CAPTION_VARIANTS)]
    return variant.format(word=word, n=label)


def render_digit(image: np.ndarray, size: int) -> Image.Image:
    """8x8 ink levels 0..16 -> `size` px RGB, dark ink on white (tests/training convention)."""
    pixels = (255 - image * 255 / 16).astype(np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB")


def digit_samples(size: int) -> list[Sample]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    return [
        Sample(
            name=f"digit_{i:05d}",
            source="sklearn_digits",
            caption=digit_caption(i, int(label)),
            render=lambda img=img: render_digit(img, size),
        )
        for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True))
    ]


# ---------------------------------------------------------------------------------------------
# photos


def _on_white(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (logos and clip art are RGBA)."""
    if img.mode in ("RGBA", "LA", "PA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_photo(spec: PhotoSpec) -> Image.Image:
    """The full-resolution RGB photo from the installed package (never a download)."""
    if spec.source == "matplotlib":
        from matplotlib import cbook

        with cbook.get_sample_data(spec.loader) as f:
            img = Image.open(f)
            img.load()
        return _on_white(img)
    from skimage import data

    array = getattr(data, spec.loader)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    if array.dtype == bool:  # the horse silhouette
        array = np.where(array, 255, 0).astype(np.uint8)  # True = background
    return _on_white(Image.fromarray(array))


def crop_view(img: Image.Image, view: int, size: int, *, mirror: bool = True) -> Image.Image:
    """View `view` of PHOTO_VIEWS: a square crop resized to `size`, mirrored if asked."""
    scale, fx, fy, flip = PHOTO_VIEWS[view]
    w, h = img.size
    side = max(1, round(min(w, h) * scale))
    left, top = round(fx * (w - side)), round(fy * (h - side))
    out = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip and mirror else out


def photo_samples(size: int, warn: Callable[[str], None]) -> tuple[list[Sample], list[str]]:
    """All views of every bundled photo that loads, and the names of those that did not."""
    samples, skipped = [], []
    for spec in PHOTOS:
        try:
            full = load_photo(spec)
        except Exception as e:  # a package version without that file: skip it, keep going
            warn(f"skipping photo {spec.name} ({spec.source}:{spec.loader}): {e}")
            skipped.append(spec.name)
            continue
        for view in range(VIEWS_PER_PHOTO):
            samples.append(
                Sample(
                    name=f"photo_{spec.name}_{view}",
                    source=spec.source,
                    caption=spec.caption,
                    render=lambda full=full, view=view, m=spec.mirror: crop_view(
                        full, view, size, mirror=m
                    ),
                )
            )
    return samples, skipped


# ---------------------------------------------------------------------------------------------
# split and write


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> dict[str, str]:
    """name -> "train"/"val": a seeded permutation per source, round(fraction * n) to val."""
    by_source: dict[str, list[str]] = {}
    for s in samples:
        by_source.setdefault(s.source, []).append(s.name)
    split = {}
    for offset, source in enumerate(SOURCES):
        names = sorted(by_source.get(source, []))
        rng = np.random.default_rng([seed, offset])  # independent stream per source
        order = rng.permutation(len(names))
        n_val = round(val_fraction * len(names))
        for rank, i in enumerate(order):
            split[names[i]] = "val" if rank < n_val else "train"
    return split


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write_samples(
    root: Path, samples: list[Sample], split: dict[str, str], progress: bool
) -> Counter:
    """Write NAME.png + NAME.txt into root/<split>/; returns counts per (split, source)."""
    counts: Counter = Counter()
    for name in ("train", "val"):
        (root / name).mkdir()
    for s in tqdm(samples, desc="demo-data", unit="img", disable=not progress, file=sys.stderr):
        folder = root / split[s.name]
        # Plain writes: the whole tree is built in a temporary directory and renamed into
        # place at the end, so no reader can see a half-written file under the final name.
        (folder / f"{s.name}.png").write_bytes(_png_bytes(s.render()))
        (folder / f"{s.name}.txt").write_text(s.caption + "\n", encoding="utf-8")
        counts[(split[s.name], s.source)] += 1
    return counts


def _summary(counts: Counter, size: int, val_fraction: float, seed: int, skipped: list) -> dict:
    per_split = {
        split: {src: counts[(split, src)] for src in SOURCES} for split in ("train", "val")
    }
    return {
        "size": size,
        "val_fraction": val_fraction,
        "seed": seed,
        "counts": per_split,
        "totals": {split: sum(c.values()) for split, c in per_split.items()},
        "photos": len(PHOTOS) - len(skipped),
        "views_per_photo": VIEWS_PER_PHOTO,
        "skipped_photos": skipped,
        "digit_caption": DIGIT_CAPTION,
        "digit_caption_variants": list(DIGIT_CAPTION_VARIANTS),
    }


def _readme(summary: dict) -> str:
    photos = "\n".join(
        f"- photo_{p.name}_0..{VIEWS_PER_PHOTO - 1}: {p.source} {p.loader!r}; "
        f'"{p.caption}"; {p.licence}'
        for p in PHOTOS
        if p.name not in summary["skipped_photos"]
    )
    counts = json.dumps(summary["counts"], indent=2)
    return f"""Demo image-caption set, written by mmdit-demo-data \
(data_pipeline/testing/demo_set.py).

Settings: --size {summary["size"]} --val-fraction {summary["val_fraction"]} \
--seed {summary["seed"]}

Layout
- train/NAME.png, train/NAME.txt: {summary["totals"]["train"]} images ({summary["size"]}x\
{summary["size"]} RGB PNG) and their captions (same stem). Shard with
  mmdit-shards write --images-dir train --out SHARDS
- val/: {summary["totals"]["val"]} held-out images, same layout.
- summary.json: counts per source and split, the settings above.

Counts (split -> source -> images):
{counts}

Sources and licences
- digit_NNNNN: {DIGITS_LICENCE}; 8x8 ink levels drawn dark-on-white and upsampled (bicubic).
  NNNNN is the index in sklearn.datasets.load_digits(). Captions: "{DIGIT_CAPTION}"
  (e.g. "a handwritten digit seven"); every {DIGIT_VARIANT_EVERY}th digit uses one of
  {", ".join(repr(v) for v in DIGIT_CAPTION_VARIANTS)} instead.
- photo_NAME_V: sample images bundled with scikit-image (skimage.data; licences as its
  docstrings state) and matplotlib (mpl-data/sample_data). View V is a fixed square crop
  (V=0: the full centre square; others smaller/offset crops, odd V mirrored except for text);
  every view of a photo has the photo's caption.
{photos}
"""


def build(out: Path, *, size: int, val_fraction: float, seed: int, progress: bool = True) -> dict:
    """Write the data set into the (new, empty) directory `out`; returns the summary."""

    def warn(msg: str) -> None:  # shown even with --quiet: a missing photo changes the counts
        print(f"warning: {msg}", file=sys.stderr, flush=True)

    photos, skipped = photo_samples(size, warn)
    samples = digit_samples(size) + photos
    split = split_samples(samples, val_fraction, seed)
    counts = _write_samples(out, samples, split, progress)
    summary = _summary(counts, size, val_fraction, seed, skipped)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out / "README.txt", _readme(summary))
    return summary


def make_demo_data(
    out: str | os.PathLike,
    *,
    size: int = 32,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build the demo set in `out` (see the module docstring); returns the summary dict.

    Raises ValueError for bad settings and FileExistsError when `out` exists and is not empty
    (unless `overwrite`, which replaces it wholesale once the new set is complete)."""
    if not (MIN_SIZE <= size <= MAX_SIZE) or size % 8:
        raise ValueError(f"size {size} must be a multiple of 8 in [{MIN_SIZE}, {MAX_SIZE}]")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val fraction {val_fraction} must be in [0, 1)")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    with atomic_directory(out) as tmp:  # replaces out wholesale once complete
        summary = build(tmp, size=size, val_fraction=val_fraction, seed=seed, progress=progress)
    return summary


def iter_captions(folder: Path) -> Iterator[tuple[Path, str]]:
    """(image path, caption) pairs of one split folder, sorted by name (for tests and checks)."""
    for png in sorted(folder.glob("*.png")):
        yield png, png.with_suffix(".txt").read_text(encoding="utf-8").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmdit-demo-data",
        description=(
            "Build a small real image-caption set for the demo from images that ship with "
            "installed packages (no downloads): the 1,797 scikit-learn handwritten digits "
            "('a handwritten digit seven') and the scikit-image / matplotlib sample photos "
            f"({VIEWS_PER_PHOTO} crops each, hand-written captions). Writes OUT/train/ and "
            "OUT/val/ (NAME.png + NAME.txt caption), OUT/README.txt and OUT/summary.json."
        ),
        epilog=(
            "Example: mmdit-demo-data --out runs/demo/data && "
            "mmdit-shards write --images-dir runs/demo/data/train --out runs/demo/shards. "
            "The same --seed and --val-fraction always give the same split and files."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory to create")
    parser.add_argument(
        "--size", type=int, default=32, help="image side in px, a multiple of 8 (default: 32)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of each source held out in OUT/val (default: 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists and is not empty"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    try:
        summary = make_demo_data(
            args.out,
            size=args.size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))  # exits with status 2
    counts = ", ".join(
        f"{split}: " + " + ".join(f"{n} {src}" for src, n in c.items())
        for split, c in summary["counts"].items()
    )
    print(
        f"wrote {summary['totals']['train']} train + {summary['totals']['val']} val images "
        f"({args.size} px; {counts}) to {args.out.absolute()} in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
