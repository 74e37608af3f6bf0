"""One source shard -> one cache shard: each sample decoded to its bucket and cropped, batched
per bucket through the VAE and the text encoders, written as {key}.safetensors + {key}.json (the
format is in data_pipeline.cache_format), published atomically with its bad-sample counts."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.bad_samples import BadSample, BadSampleCounter
from data_pipeline.buckets import Bucket, bucket_families, decode_to_bucket
from data_pipeline.cache_format import TENSOR_EXT, encode_tensors
from data_pipeline.config import DataConfig
from data_pipeline.images import image_to_tensor
from data_pipeline.tar_samples import iter_samples, parse_sample
from mmdit.atomic_file import atomic_path, write_atomic
from mmdit.conditioning import VAE, TextEncoders

STATS_SUFFIX = ".stats.json"


def crop_rng(seed: int, shard_name: str, index: int) -> random.Random:
    """The RNG of a random crop: seeded by (data.seed, source shard basename, index of the sample
    in the shard), so a re-run or another rank (wherever the source is mounted) crops the
    same way."""
    return random.Random(f"precompute-crop:{seed}:{shard_name}:{index}")


@dataclass
class _Pending:
    key: str
    url: str
    caption: str
    image: Any  # (3, h, w) float tensor in [-1, 1]
    bucket: Bucket
    crop_top_left: tuple[int, int]
    original_size: tuple[int, int]


class ShardEncoder:
    """Encodes the samples of one source shard into one cache shard."""

    def __init__(self, data: DataConfig, vae: VAE, text: TextEncoders, batch: int):
        self.data = data
        self.vae = vae
        self.text = text
        self.batch = batch
        self.buckets = bucket_families(data)

    def run(self, url: str, dest: Path) -> dict[str, int]:
        """Write the cache shard of `url` to `dest` (atomically) and its stats beside it."""
        counter = BadSampleCounter()
        with atomic_path(dest) as tmp:
            self._write(url, dest.name, tmp, counter)
            stats = {"shard": dest.name, "source_url": url, **counter.as_dict()}
            write_atomic(
                dest.with_name(dest.name[: -len(".tar")] + STATS_SUFFIX),
                json.dumps(stats, indent=2).encode(),
            )
        return counter.as_dict()

    def _write(self, url: str, name: str, tmp: Path, counter: BadSampleCounter) -> None:
        """The cache shard into `tmp`: samples queued per bucket, each queue encoded when full,
        the rest in bucket order at the end."""
        import webdataset as wds

        data = self.data
        pending: dict[Bucket, list[_Pending]] = {}
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            samples = iter_samples(
                url,
                counter,
                open_retries=data.shard_open_retries,
                retry_wait_s=data.shard_retry_wait_s,
            )
            for index, sample in enumerate(samples):
                try:
                    item = self._prepare(sample, name, index)
                except BadSample as e:
                    counter.add_bad(e.reason)
                    continue
                queue = pending.setdefault(item.bucket, [])
                queue.append(item)
                if len(queue) >= self.batch:
                    self._flush(queue, writer, counter)
            for bucket in sorted(pending):
                self._flush(pending[bucket], writer, counter)
            writer.close()
            f.flush()
            os.fsync(f.fileno())

    def _prepare(self, sample: dict, shard_name: str, index: int) -> _Pending:
        """The sample parsed, decoded to its bucket and cropped. Raises BadSample."""
        data = self.data
        parsed = parse_sample(sample, caption=data.caption, empty_caption=data.empty_caption)
        rng = crop_rng(data.seed, shard_name, index) if data.crop == "random" else None
        img, bucket, top_left, original = decode_to_bucket(
            parsed["image_bytes"],
            self.buckets,
            data.crop,
            rng,
            min_side=data.bucket_multiple,
            key=parsed["key"],
        )
        return _Pending(
            parsed["key"],
            parsed["url"],
            parsed["caption"],
            image_to_tensor(img),
            bucket,
            top_left,
            original,
        )

    def _flush(self, items: list[_Pending], writer, counter: BadSampleCounter) -> None:
        import torch

        if not items:
            return
        images = torch.stack([p.image for p in items])
        mean, logvar = self.vae.encode(images)
        emb = self.text.encode([p.caption for p in items])
        bf16 = torch.bfloat16
        for i, p in enumerate(items):
            tensors = {
                "mean": mean[i].to(bf16),
                "logvar": logvar[i].to(bf16),
                "context": emb.context[i].to(bf16),
                "pooled": emb.pooled[i].to(bf16),
            }
            meta = {
                "key": p.key,
                "source_key": p.key,
                "source_url": p.url,
                "caption": p.caption,
                "bucket": list(p.bucket),
                "crop_top_left": list(p.crop_top_left),
                "original_size": list(p.original_size),
            }
            writer.write(
                {
                    "__key__": p.key,
                    TENSOR_EXT: encode_tensors(tensors),
                    "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                }
            )
            counter.add_good()
        items.clear()
