"""The `data` section of a run file: where image-caption shards are and how they are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DataConfig:
    # Shards: a brace pattern (`/data/{000000..000999}.tar`), a directory, or a text file
    # listing one shard per line. Local paths or any URL webdataset opens (`pipe:`, fsspec).
    shards: str = ""
    # Precomputed cache shards (VAE latents + text embeddings); when set, training reads
    # these instead of decoding images and running the frozen encoders.
    cache_shards: str = ""
    # Aspect-ratio buckets at a target pixel area of resolution**2; sides are multiples of
    # bucket_multiple (VAE factor 8 x patch size 2 = 16).
    resolution: int = 256
    # Several target areas in one run (e.g. [512, 1024]): one bucket family per resolution,
    # each image goes to the largest one whose area it covers (else the smallest), and a
    # micro batch of resolution r holds train.micro_batch_size x (min(resolutions) / r)**2
    # samples (rounded down, >= 1). Empty = only `resolution`; when set, `resolution` must be
    # one of them (the size previews and FID use).
    resolutions: tuple[int, ...] = ()
    bucket_multiple: int = 16
    max_aspect_ratio: float = 2.0
    crop: Literal["center", "random"] = "center"
    # Caption source: the `txt` member, or a field of the `json` member as "json:<field>".
    caption: str = "txt"
    # A sample whose caption is missing or empty: skip it, or train it as an empty prompt.
    empty_caption: Literal["skip", "keep"] = "skip"
    shuffle_buffer: int = 1000
    seed: int = 0
    # Resampling draws shards with replacement forever (infinite stream) instead of epochs.
    resample: bool = False
    num_workers: int = 2
    # Abort (with the counts per reason) when more than this fraction of samples is bad.
    max_bad_fraction: float = 0.01
    # A shard that cannot be opened (vanished, permission denied, I/O error: what an NFS or
    # object-store hiccup looks like) is tried this many more times, shard_retry_wait_s
    # apart, before it is skipped and counted as `unreadable_shard`.
    shard_open_retries: int = 2
    shard_retry_wait_s: float = 1.0

    @property
    def all_resolutions(self) -> tuple[int, ...]:
        """The bucket families' resolutions, smallest first."""
        return tuple(sorted(self.resolutions or (self.resolution,)))

    def __post_init__(self):
        if self.resolution <= 0 or self.resolution % self.bucket_multiple:
            raise ValueError(
                f"resolution={self.resolution} must be a positive multiple of "
                f"bucket_multiple={self.bucket_multiple}"
            )
        for r in self.resolutions:
            if r <= 0 or r % self.bucket_multiple:
                raise ValueError(
                    f"data.resolutions has {r}: every resolution must be a positive multiple "
                    f"of bucket_multiple={self.bucket_multiple}"
                )
        if self.resolutions and self.resolution not in self.resolutions:
            raise ValueError(
                f"data.resolution={self.resolution} is not in data.resolutions="
                f"{list(self.resolutions)}: set data.resolution to one of them (the size "
                "previews and FID use)"
            )
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError(f"data.resolutions={list(self.resolutions)} has duplicates")
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"max_aspect_ratio={self.max_aspect_ratio} must be >= 1.0")
        if not (self.caption == "txt" or self.caption.startswith("json:")):
            raise ValueError(f"caption={self.caption!r} must be 'txt' or 'json:<field>'")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("num_workers and shuffle_buffer must be >= 0")
        if self.shard_open_retries < 0 or self.shard_retry_wait_s < 0:
            raise ValueError(
                f"shard_open_retries={self.shard_open_retries} and shard_retry_wait_s="
                f"{self.shard_retry_wait_s} must be >= 0"
            )
