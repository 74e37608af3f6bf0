"""One raw tar sample -> one typed sample (data_pipeline.batches), for training and evaluation.

Which decoder reads a sample depends on what the shards hold (`ShardKind`): raw image shards are
parsed, decoded and cropped to their aspect bucket; cache shards (mmdit-precompute) are read as
stored. A sample that cannot be used raises BadSample, so the caller skips and counts it.
"""

from __future__ import annotations

import json
import random
from typing import Literal

from data_pipeline.bad_samples import BadSample
from data_pipeline.batches import ImageSample, LatentSample, Sample
from data_pipeline.buckets import BucketFamilies, decode_to_bucket
from data_pipeline.cache_format import decode_tensors
from data_pipeline.config import DataConfig
from data_pipeline.images import image_to_tensor
from data_pipeline.tar_samples import parse_sample

ShardKind = Literal["images", "latents"]  # raw image shards, or precomputed cache shards
Ref = tuple[int, str, int]  # (epoch, shard url, index of the sample in the shard)


def decode_item(
    config: DataConfig,
    mode: ShardKind,
    buckets: BucketFamilies | None,
    ref: Ref,
    sample: dict,
    crop: Literal["center", "random"] | None = None,
) -> Sample:
    """A raw sample of `mode` shards -> one sample; raises BadSample to skip it. Images need
    `buckets`; `crop` overrides config.crop (evaluation always crops the centre)."""
    if mode == "latents":
        return decode_cached(sample)
    return decode_image(config, buckets, ref, sample, crop or config.crop)


def decode_cached(sample: dict) -> LatentSample:
    """A cache sample: its metadata and stored tensors, as they are."""
    key = sample["__key__"]
    try:
        info = json.loads(sample["json"])
        tensors = decode_tensors(sample["safetensors"])
    except KeyError as e:
        raise BadSample("corrupt_image", f"{key}: cache sample has no {e} member") from None
    except Exception as e:  # a damaged member must not stop the run
        raise BadSample("corrupt_image", f"{key}: unreadable cache sample: {e}") from None
    return LatentSample(
        key=key,
        caption=info.get("caption", ""),
        bucket=tuple(info["bucket"]),
        crop_top_left=tuple(info["crop_top_left"]),
        original_size=tuple(info["original_size"]),
        mean=tensors["mean"],
        logvar=tensors["logvar"],
        context=tensors["context"],
        pooled=tensors["pooled"],
    )


def decode_image(
    config: DataConfig,
    buckets: BucketFamilies,
    ref: Ref,
    sample: dict,
    crop: Literal["center", "random"],
) -> ImageSample:
    """An image sample, resized and cropped to its bucket; a random crop is seeded by the
    sample's (epoch, shard, index), so it is the same after a resume."""
    epoch, url, index = ref
    meta = parse_sample(sample, caption=config.caption, empty_caption=config.empty_caption)
    crop_rng = random.Random(f"crop:{config.seed}:{epoch}:{url}:{index}")
    image, bucket, top_left, original = decode_to_bucket(
        meta["image_bytes"],
        buckets,
        crop,
        crop_rng,
        min_side=config.bucket_multiple,
        key=meta["key"],
    )
    return ImageSample(
        key=meta["key"],
        caption=meta["caption"],
        bucket=bucket,
        crop_top_left=top_left,
        original_size=original,
        image=image_to_tensor(image),
    )
