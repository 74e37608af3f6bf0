"""Offline stand-ins for the metric networks, and real images to score.

- `inception_weights`: a seeded random-init torch-fidelity InceptionV3 state dict, saved under
  the real file name, so FID code runs end to end without the 95 MB download.
- `tiny_clip`: a tiny open_clip architecture (config JSON) and a seeded random checkpoint.
- `sample_images`: two visibly different sets of real 64x64 RGB images (scikit-image photos,
  scikit-learn digits) as uint8 tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from eval.fid import INCEPTION_FILE

IMAGE_SIZE = 64
IMAGES_PER_SET = 16  # Inception runs at 299 px on the CPU (~0.4 s per image): keep sets small

TINY_CLIP_NAME = "tiny-test-clip"  # open_clip registers configs by file stem: keep it unique
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of torch-fidelity's InceptionV3 with seeded random weights, built offline.

    The constructor always loads weights (from the URL when no path is given); a subclass whose
    `load_state_dict` is a no-op, handed a path to an empty dict, skips that and keeps the
    random init.
    """
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _NoWeights(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        torch.manual_seed(seed)
        model = _NoWeights("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    # PyTorch's default conv init (kaiming_uniform, a=sqrt(5)) shrinks the signal ~2.5x per
    # layer; after ~20 conv+ReLU layers the 2048 features are ~1e-8 and their covariance is at
    # float round-off level, which would make every FID comparison meaningless. He-normal init
    # for ReLU keeps activations O(0.1-1) and varying across images (BN stays identity: running
    # mean 0, var 1).
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            std = (2.0 / fan_in) ** 0.5
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random-init torch-fidelity InceptionV3 state dict, saved as INCEPTION_FILE."""
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(random_inception_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    """(open_clip model-config JSON, seeded random checkpoint) of a tiny CLIP."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny_clip")
    config_path = root / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME)
    checkpoint_path = root / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint_path)
    return config_path, checkpoint_path


class SampleImages(NamedTuple):
    photos: torch.Tensor  # (16, 3, 64, 64) uint8: scikit-image sample photographs
    digits: torch.Tensor  # (16, 3, 64, 64) uint8: scikit-learn 8x8 digits, upsampled, RGB


def _square(image: np.ndarray, size: int, zoom: float) -> np.ndarray:
    """Centre crop of side zoom * short side, resized to size x size, as (H, W, 3) uint8."""
    img = Image.fromarray(image).convert("RGB")
    w, h = img.size
    side = int(min(w, h) * zoom)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def _photos(size: int, count: int) -> torch.Tensor:
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"]
    names += ["immunohistochemistry", "colorwheel", "cat", "camera", "coins", "moon", "clock"]
    sources = [getattr(data, n)() for n in names]
    # Full view and a 2x zoom of each photo: 24 distinct images, the first `count` are used.
    views = [_square(s, size, zoom) for zoom in (1.0, 0.5) for s in sources][:count]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()


def _digits(size: int, count: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count]  # (count, 8, 8) float in 0..16
    gray = (digits * (255.0 / 16.0)).round().astype(np.uint8)
    big = [
        np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.NEAREST)) for g in gray
    ]
    rgb = np.repeat(np.stack(big)[:, None], 3, axis=1)  # (count, 3, size, size)
    return torch.from_numpy(rgb).contiguous()


@pytest.fixture(scope="session")
def sample_images() -> SampleImages:
    """Two different sets of 16 real 64x64 RGB uint8 images (N, 3, 64, 64)."""
    return SampleImages(_photos(IMAGE_SIZE, IMAGES_PER_SET), _digits(IMAGE_SIZE, IMAGES_PER_SET))
