"""FID of generated images against reference images: the same number torch-fidelity gives.

One module: the weights check, the extractor, the statistics and their cache each hold part of
the agreement with torch-fidelity and are read together; the image-folder reader is the
reference set's one input helper.

Nothing here reimplements the metric: the feature extractor is torch-fidelity's own
`FeatureExtractorInceptionV3` (the TF-compatible InceptionV3 with its TF1-style bilinear resize
to 299 px, "2048" pool features), and the statistics and the Fréchet distance are torch-fidelity's
`fid_features_to_statistics` / `fid_statistics_to_metric`. So a number from here can be put
next to a number from `fidelity --fid` and compared (they agree to ~1e-7 relative; the only
difference is that the feature mean is accumulated in float64 here, float32 there).

What this module adds is what a training cluster needs around it:

- the Inception weights are never downloaded: `find_inception_weights` finds a local copy and
  otherwise fails with a message saying exactly what to fetch and where to put it;
- the weights file is opened with `torch.load(weights_only=True)` before torch-fidelity unpickles
  it with `weights_only=False`, so a tampered file is refused instead of executed;
- reference statistics (the expensive half of FID) are cached on disk under a hash of what they
  were computed from (`reference_statistics`), with that description stored beside them;
- images come from any iterable of uint8 batches (a sampler, a shard reader, `load_image_folder`).

There is no distributed code: ranks extract features with `InceptionFeatures`, the caller
gathers them, and `statistics` takes the concatenated (N, 2048) features.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmdit.atomic_file import write_atomic

log = logging.getLogger(__name__)

# The file torch-fidelity downloads (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3)
# and the name torch.hub's cache gives it, so a machine that ever ran torch-fidelity has it already.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
EXTRACTOR_NAME = "torch-fidelity-inception-v3-compat"
FEATURE_LAYER = "2048"  # torch-fidelity's default FID layer: the 2048-d average-pool output
FEATURE_DIM = 2048

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# What to tell a person whose run cannot find weights: the two ways to point at a file.
_INCEPTION_FLAG = "--inception-weights PATH"
_INCEPTION_CONFIG_KEY = "eval.inception_weights"


class MissingWeightsError(FileNotFoundError):
    """A metric's network weights are not on this machine (nothing is ever downloaded)."""


class InvalidWeightsError(ValueError):
    """A weights file exists but is not a plain state dict of tensors."""


# --------------------------------------------------------------------------------------------
# Weights: find, verify, fingerprint
# --------------------------------------------------------------------------------------------


def _hub_checkpoint_dir() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME (and $XDG_CACHE_HOME), read at call time.
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local InceptionV3 weights file: `path` when given, else torch.hub's checkpoint cache.

    Raises `MissingWeightsError` naming the file, every place looked, the URL to fetch it from on
    a machine with internet access and how to point a run at it.
    """
    if path is not None and str(path) != "":
        candidates = [Path(path).expanduser()]
        if candidates[0].is_dir():  # a folder holding the file is accepted too
            candidates = [candidates[0] / INCEPTION_FILE]
    else:
        candidates = [_hub_checkpoint_dir() / INCEPTION_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = "\n".join(f"  - {c}" for c in candidates)
    raise MissingWeightsError(
        f"InceptionV3 weights for FID ({INCEPTION_FILE}) not found. Looked in:\n{looked}\n"
        f"Nothing is downloaded at evaluation time. On a machine with internet access fetch\n"
        f"  {INCEPTION_URL}\n"
        f"and either copy it to {_hub_checkpoint_dir() / INCEPTION_FILE} "
        f"(torch.hub's cache: $TORCH_HOME/hub/checkpoints/) or pass {_INCEPTION_FLAG} "
        f"(run-file key {_INCEPTION_CONFIG_KEY})."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def verify_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load `path` with `weights_only=True` and check it is a flat {name: Tensor} state dict.

    torch-fidelity loads the Inception file with `torch.load(weights_only=False)`, i.e. it
    unpickles it, which can execute code. Calling this first means such a file is rejected by
    the restricted unpickler before torch-fidelity ever sees it.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        raise InvalidWeightsError(
            f"{path} is not a plain tensor state dict: torch.load(weights_only=True) refused it "
            f"({_first_line(exc)}). It is not unpickled further because that could run "
            f"arbitrary code. Replace it with a fresh copy of {INCEPTION_URL}."
        ) from exc
    if not isinstance(state, Mapping) or not state:
        raise InvalidWeightsError(
            f"{path} holds a {type(state).__name__}, not a non-empty state dict "
            f"{{name: Tensor}}. Replace it with a fresh copy of {INCEPTION_URL}."
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise InvalidWeightsError(
            f"{path} is not a state dict of tensors: entries {bad[:5]!r} are not str -> Tensor. "
            f"Replace it with a fresh copy of {INCEPTION_URL}."
        )
    return dict(state)


# sha256 of big weights files takes seconds; remember it per (path, size, mtime) so a file that
# is replaced in place is hashed again.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, computed once per (resolved path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


def check_uint8_images(images: Any, what: str = "images") -> torch.Tensor:
    """Raise a clear error unless `images` is a uint8 Tensor (N, 3, H, W); return it."""
    if not torch.is_tensor(images):
        raise TypeError(
            f"{what} must be a torch.Tensor (N, 3, H, W) of dtype uint8, got "
            f"{type(images).__name__}"
        )
    if images.dtype != torch.uint8:
        raise TypeError(
            f"{what} must have dtype torch.uint8 (pixel values 0..255), got {images.dtype}; "
            f"convert floats in [0, 1] with (x * 255).round().clamp(0, 255).to(torch.uint8)"
        )
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(
            f"{what} must have shape (N, 3, H, W) (RGB, channels first), got {tuple(images.shape)}"
        )
    return images


class InceptionFeatures:
    """torch-fidelity's InceptionV3 "2048" features of uint8 RGB images, loaded from a local file.

    Images of any size are accepted: the network resizes them to 299x299 itself, with
    torch-fidelity's TF1-compatible bilinear interpolation, exactly as `fidelity` does.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.weights_path = find_inception_weights(weights_path)
        verify_state_dict_file(self.weights_path)  # before torch-fidelity unpickles it
        try:
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                [FEATURE_LAYER],
                feature_extractor_weights_path=str(self.weights_path),
            )
        except RuntimeError as exc:  # load_state_dict: missing / unexpected / mis-shaped keys
            raise InvalidWeightsError(
                f"{self.weights_path} is a state dict but not torch-fidelity's InceptionV3 "
                f"({_first_line(exc)}). Use {INCEPTION_URL}."
            ) from exc
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._model = model.to(self.device).eval().requires_grad_(False)

    @property
    def identity(self) -> dict[str, Any]:
        """What determines the features: part of every reference-statistics cache key."""
        import torch_fidelity

        return {
            "extractor": EXTRACTOR_NAME,
            "layer": FEATURE_LAYER,
            "weights_file": self.weights_path.name,
            "weights_size": self.weights_path.stat().st_size,
            "weights_sha256": file_sha256(self.weights_path),
            "torch_fidelity": torch_fidelity.__version__,
        }

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float64 (N, 2048) on the CPU, `batch_size` images at a time."""
        check_uint8_images(images)
        out = [torch.empty(0, FEATURE_DIM, dtype=torch.float64)]
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(self.device)
            (features,) = self._model(batch)  # (B, 2048) float32
            out.append(features.to(device="cpu", dtype=torch.float64))
        return torch.cat(out)  # (N, 2048)


def extract_features(
    batches: Iterable[torch.Tensor],
    extractor: Callable[[torch.Tensor], torch.Tensor],
    *,
    progress: bool = True,
    total: int | None = None,
    desc: str = "inception features",
) -> torch.Tensor:
    """Run `extractor` over every uint8 batch (B, 3, H, W) -> concatenated (N, D) features."""
    from tqdm import tqdm

    chunks = []
    with tqdm(
        total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False
    ) as bar:
        for i, batch in enumerate(batches):
            check_uint8_images(batch, f"batch {i}")
            chunks.append(extractor(batch))
            bar.update(batch.shape[0])
    if not chunks:
        raise ValueError("no image batches to extract features from (the iterable was empty)")
    features = torch.cat(chunks)  # (N, D)
    log.info("%s: %d images -> features %s", desc, features.shape[0], tuple(features.shape))
    return features


# --------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare mu/sigma explicitly
class FidStatistics:
    """Mean (D,) and covariance (D, D) of a feature set, and how many samples made them."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def __post_init__(self):
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0],) * 2:
            raise ValueError(
                f"FidStatistics needs mu (D,) and sigma (D, D); got mu {self.mu.shape}, "
                f"sigma {self.sigma.shape}"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (no pickled objects) atomically: a reader never sees half a file."""
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))
        return write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FidStatistics:
        """Read what `save` wrote; `allow_pickle=False` so a crafted file cannot run code."""
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma", "count"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a FidStatistics file: missing {sorted(missing)}")
            return cls(mu=data["mu"], sigma=data["sigma"], count=int(data["count"]))


def statistics(features: torch.Tensor) -> FidStatistics:
    """Mean and covariance of (N, D) features, via torch-fidelity's `fid_features_to_statistics`.

    Features are used in float64 (torch-fidelity's own features are float32, and it takes the
    mean in float32; the covariance is float64 in both). N >= 2 is needed for a covariance.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if not torch.is_tensor(features) or features.dim() != 2:
        raise ValueError(
            f"features must be a Tensor (N, D), got "
            f"{tuple(features.shape) if torch.is_tensor(features) else type(features).__name__}"
        )
    if features.shape[0] < 2:
        raise ValueError(
            f"FID statistics need at least 2 feature vectors for a covariance, got "
            f"{features.shape[0]}; evaluate more images (thousands for a meaningful FID)"
        )
    features = features.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf; check the images and the weights file")
    stats = fid_features_to_statistics(features)  # mu (D,), sigma (D, D), both float64
    return FidStatistics(mu=stats["mu"], sigma=stats["sigma"], count=int(features.shape[0]))


def frechet_distance(a: FidStatistics, b: FidStatistics) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), by torch-fidelity's formula.

    torch-fidelity takes tr((S_a S_b)^1/2) as the sum of square roots of the eigenvalues of
    S_a S_b (complex sqrt, real part), which avoids scipy.linalg.sqrtm's failure modes on the
    rank-deficient covariances of small sample sets.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.mu.shape != b.mu.shape:
        raise ValueError(
            f"cannot compare statistics of different feature sizes: {a.mu.shape} vs "
            f"{b.mu.shape} (were they made with the same extractor and layer?)"
        )
    # torch-fidelity asserts equal dtypes; float64 throughout keeps both sides comparable.
    stat_a = {"mu": a.mu.astype(np.float64), "sigma": a.sigma.astype(np.float64)}
    stat_b = {"mu": b.mu.astype(np.float64), "sigma": b.sigma.astype(np.float64)}
    return float(fid_statistics_to_metric(stat_a, stat_b, verbose=False)[KEY_METRIC_FID])


# --------------------------------------------------------------------------------------------
# Reference statistics cache
# --------------------------------------------------------------------------------------------


def _canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"data_key must be JSON-serialisable (str, numbers, lists, dicts) so it can be "
            f"hashed and stored: {exc}. Convert paths with str() and times with float()."
        ) from exc


def reference_cache_paths(
    data_key: Mapping, identity: Mapping, cache_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """(stats .npz, sidecar .json) for a data_key + extractor identity inside `cache_dir`."""
    key = _canonical_json({"data": data_key, "extractor": identity})
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    stem = Path(cache_dir) / f"fid-ref-{digest}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def _load_cached(path: Path) -> FidStatistics | None:
    if not path.is_file():
        return None
    try:
        return FidStatistics.load(path)
    except Exception as exc:  # a truncated or foreign file: recompute rather than crash
        log.warning("FID reference cache %s is unreadable (%s); recomputing", path, exc)
        return None


def reference_statistics(
    images: Callable[[], Iterable[torch.Tensor]],
    *,
    data_key: Mapping,
    extractor: InceptionFeatures,
    cache_dir: str | os.PathLike | None,
    progress: bool = True,
) -> FidStatistics:
    """Statistics of the reference images, from the disk cache when they were computed before.

    `images()` is only called on a cache miss, so opening shards costs nothing on a hit.
    `data_key` must describe the reference set completely (e.g. shard list, sizes, mtimes,
    resolution, count): together with `extractor.identity` it names the cache file, and it is
    stored in a sidecar .json so a person can see what the statistics were computed from.
    `cache_dir=None` disables the cache.
    """
    if cache_dir is None:
        return statistics(extract_features(images(), extractor, progress=progress))
    identity = extractor.identity
    npz_path, json_path = reference_cache_paths(data_key, identity, cache_dir)
    cached = _load_cached(npz_path)
    if cached is not None:
        log.info("FID reference statistics: cache hit %s (%d images)", npz_path, cached.count)
        return cached
    log.info("FID reference statistics: cache miss, computing into %s", npz_path)
    stats = statistics(extract_features(images(), extractor, progress=progress, desc="reference"))
    # Sidecar first: a present .npz then always has its description next to it.
    sidecar = {"data_key": data_key, "extractor": identity, "count": stats.count}
    write_atomic(json_path, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    stats.save(npz_path)
    return stats


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _image_files(folder: Path, limit: int | None) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (or is not a directory)")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ValueError(
            f"image folder {folder} has no {'/'.join(IMAGE_SUFFIXES)} files (sub-folders are "
            f"not searched)"
        )
    return files if limit is None else files[:limit]


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    # Shorter side -> size (bicubic), then the central size x size square, so that images of
    # different shapes can share a batch.
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _read_image(path: Path, size: int | None) -> torch.Tensor:
    with Image.open(path) as img:
        img = img.convert("RGB")
    if size is not None:
        img = _resize_center_crop(img, size)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def _batches(files: list[Path], size: int | None, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        tensors = [_read_image(p, size) for p in chunk]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(
                f"images in {chunk[0].parent} have different sizes {sorted(shapes)[:4]} and "
                f"cannot be batched; pass size=N to resize and centre-crop them to N x N"
            )
        yield torch.stack(tensors)  # (B, 3, H, W) uint8


def load_image_folder(
    folder: str | os.PathLike,
    size: int | None = None,
    limit: int | None = None,
    batch_size: int = 64,
) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, H, W) of the .png/.jpg/.jpeg/.webp files in `folder`, sorted by name.

    Every image is converted to RGB. With `size`, each is resized (bicubic, shorter side to
    `size`) and centre-cropped to size x size; without it all images must share one size.
    `limit` keeps the first `limit` files. A missing or empty folder fails here, not at the
    first `next()`.
    """
    if size is not None and size < 1:
        raise ValueError(f"size={size} must be >= 1 (or None to keep the images' own size)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for every image)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    files = _image_files(Path(folder), limit)
    log.info("image folder %s: %d images", folder, len(files))
    return _batches(files, size, batch_size)
