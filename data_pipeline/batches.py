"""What a decoded sample and a loader batch are, as types: one kind per shard source.

Raw image shards give `ImageSample`s / `ImageBatch`es (pixels; the frozen VAE and text encoders
run at training time). Cache shards (mmdit-precompute) give `LatentSample`s / `LatentBatch`es
(the stored VAE posterior and text embeddings). Both kinds share the fields of `Sample` /
`Batch` (keys, captions, bucket, crop and original size), so code that only needs those reads
any batch, and code that needs the tensors dispatches on the type (isinstance / match), never on
a mode string or on which keys are present.

A batch is what torch's DataLoader hands over. It leaves these dataclasses as they are (its
default_convert passes unknown types through) and, with pin_memory=True, calls their
`pin_memory()`, which pins every tensor field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data_pipeline.buckets import Bucket

Tensor = torch.Tensor


@dataclass(frozen=True)
class Sample:
    """The fields every decoded sample has, whatever its shard source."""

    key: str
    caption: str
    bucket: Bucket  # (height, width) the sample was cropped to
    crop_top_left: tuple[int, int]  # SDXL micro-conditioning: where the crop started
    original_size: tuple[int, int]  # ... and the image's size before resizing


@dataclass(frozen=True)
class ImageSample(Sample):
    image: Tensor  # (3, H, W) in [-1, 1]


@dataclass(frozen=True)
class LatentSample(Sample):
    # As stored in the cache (bf16): the VAE posterior and the caption's text embeddings.
    mean: Tensor  # (16, H / 8, W / 8)
    logvar: Tensor  # (16, H / 8, W / 8)
    context: Tensor  # (L, 4096)
    pooled: Tensor  # (2048,)


@dataclass(frozen=True)
class Batch:
    """The fields every batch has: samples of one bucket, in the order they were stacked."""

    keys: list[str]
    captions: list[str]
    epochs: list[int]  # the epoch each sample was read in
    bucket: Bucket
    crop_top_left: Tensor  # (B, 2) int64
    original_size: Tensor  # (B, 2) int64

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """This batch with every tensor in page-locked memory (DataLoader(pin_memory=True))."""
        pinned = {
            f.name: value.pin_memory()
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **pinned)


@dataclass(frozen=True)
class ImageBatch(Batch):
    images: Tensor  # (B, 3, H, W) in [-1, 1]


@dataclass(frozen=True)
class LatentBatch(Batch):
    mean: Tensor  # (B, 16, H / 8, W / 8), as stored
    logvar: Tensor
    context: Tensor  # (B, L, 4096)
    pooled: Tensor  # (B, 2048)


def collate(samples: Sequence[Sample], epochs: list[int]) -> Batch:
    """Samples of one bucket, all of one kind -> a batch (tensors stacked, keys and captions as
    lists)."""
    shared = {
        "keys": [s.key for s in samples],
        "captions": [s.caption for s in samples],
        "epochs": epochs,
        "bucket": samples[0].bucket,
        "crop_top_left": torch.tensor([s.crop_top_left for s in samples]),
        "original_size": torch.tensor([s.original_size for s in samples]),
    }
    match samples[0]:
        case ImageSample():
            return ImageBatch(**shared, images=torch.stack([s.image for s in samples]))
        case LatentSample():
            return LatentBatch(
                **shared,
                mean=torch.stack([s.mean for s in samples]),
                logvar=torch.stack([s.logvar for s in samples]),
                context=torch.stack([s.context for s in samples]),
                pooled=torch.stack([s.pooled for s in samples]),
            )
    raise TypeError(f"cannot collate {type(samples[0]).__name__} samples")
