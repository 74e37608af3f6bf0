"""Several resolutions in one run: bucket families, which family an image joins, the micro
batch of each family, and a loader that mixes them and still resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.buckets import (
    assign_bucket,
    bucket_families,
    buckets_for,
    make_buckets,
    micro_batch_for,
)
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from tests.data_pipeline.test_loader import config, shard_dir, take  # noqa: F401 (fixture)


def test_families_hold_each_resolutions_buckets_and_images_join_by_area():
    families = bucket_families(DataConfig(resolution=1024, resolutions=(1024, 512)))
    assert families.resolutions == (512, 1024)  # smallest first, whatever the order given
    small, large = make_buckets(512), make_buckets(1024)
    assert [list(b) for _, b in families.families] == [small, large]
    assert buckets_for(DataConfig(resolution=512, resolutions=(512, 1024))) == sorted(
        set(small) | set(large)
    )
    # Every bucket's area is within multiple / (2 r) of r**2, so the families never overlap.
    for r, buckets in families.families:
        assert all(abs(h * w / r**2 - 1) <= 16 / (2 * r) for h, w in buckets)
        assert all(families.resolution_of(b) == r for b in buckets)
    assert families.resolution_of((16, 16)) is None
    # The largest resolution whose area the image covers; otherwise the smallest.
    assert families.assign(1024, 1024) == (1024, 1024)
    assert families.assign(1024, 1023) == (512, 512)  # one row short of 1024**2 pixels
    assert families.assign(100, 100) == (512, 512)  # covers none: the smallest
    assert families.assign(4096, 2048) == assign_bucket(4096, 2048, large)
    assert families.assign(1450, 725) == assign_bucket(1450, 725, large)  # 1051250 >= 1024**2
    assert families.assign(1440, 720) == assign_bucket(1440, 720, small)  # 1036800 < 1024**2
    # One resolution: the families are the old bucket list, unchanged.
    assert buckets_for(DataConfig(resolution=256)) == make_buckets(256)


def test_micro_batch_keeps_the_tokens_per_micro_batch():
    assert micro_batch_for(512, 16, 512) == 16
    assert micro_batch_for(1024, 16, 512) == 4  # 4x the pixels, a quarter of the samples
    assert micro_batch_for(768, 16, 512) == 7  # 16 / 2.25 = 7.1, rounded down
    assert micro_batch_for(1024, 1, 512) == 1  # never below one sample


def test_resolution_settings_fail_with_one_line():
    with pytest.raises(ValueError, match=r"data.resolution=256 is not in data.resolutions"):
        DataConfig(resolution=256, resolutions=(512, 1024))
    with pytest.raises(ValueError, match="data.resolutions has 500"):
        DataConfig(resolution=512, resolutions=(512, 500))
    with pytest.raises(ValueError, match="duplicates"):
        DataConfig(resolution=512, resolutions=(512, 512))
    from mmdit.model import MMDiTConfig
    from training.config import RunConfig

    # Square buckets only: 512 px = 32 patches of 16 px (VAE 8 x patch 2), 1024 px = 64.
    model = MMDiTConfig(depth=2, pos_embed_max_size=48, sample_size=32)
    RunConfig(model=model, data=DataConfig(resolution=512, max_aspect_ratio=1.0))
    data = DataConfig(resolution=512, resolutions=(512, 1024), max_aspect_ratio=1.0)
    with pytest.raises(ValueError, match=r"pos_embed_max_size=48 is smaller than the 64 patches"):
        RunConfig(model=model, data=data)


def _mixed(shard_dir, **overrides) -> DataConfig:  # noqa: F811
    # The photos are 96x64, 64x128, 160x90, 80x80 and 72x120: the first covers less than
    # 80**2 pixels and joins the 48 family, the other four the 80 family.
    return config(shard_dir, resolution=48, resolutions=(48, 80), **overrides)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_batches_have_their_familys_size_and_resume_exactly(shard_dir, num_workers):  # noqa: F811
    cfg = _mixed(shard_dir, num_workers=num_workers)
    families = bucket_families(cfg)
    total, n_before = 24, 13
    reference = take(build_loader(cfg, 0, 1, batch_size=3), total)
    sizes = {families.resolution_of(b.bucket): set() for b in reference}
    for b in reference:
        h, w = b.bucket
        assert b.images.shape[-2:] == (h, w)
        sizes[families.resolution_of((h, w))].add(len(b.keys))
    # 3 at 48 px; 3 x (48/80)**2 = 1.08 -> 1 at 80 px.
    assert sizes == {48: {3}, 80: {1}}

    interrupted = build_loader(cfg, 0, 1, batch_size=3)
    take(interrupted, n_before)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["resolutions"] == [48, 80]
    resumed = build_loader(cfg, 0, 1, batch_size=3)
    resumed.load_state_dict(state)
    for ref, got in zip(reference[n_before:], take(resumed, total - n_before), strict=True):
        assert got.keys == ref.keys and got.bucket == ref.bucket
        assert torch.equal(got.images, ref.images)

    # Another set of families is another stream: refused, naming the setting.
    other = build_loader(config(shard_dir, resolution=48), 0, 1, batch_size=3)
    with pytest.raises(ValueError, match="data.resolutions"):
        other.load_state_dict(state)


def _latent_cache(root, buckets_px: list[tuple[int, int]]) -> None:
    """One cache shard whose sample i sits in buckets_px[i] (pixels), as mmdit-precompute
    writes them (bucket in the json, latents of bucket / 8)."""
    import io
    import tarfile

    from data_pipeline.cache_format import CacheInfo, CacheLayout, encode_tensors

    layout = CacheLayout(clip_length=77, clip_l_dim=32, clip_g_dim=40, t5_length=4, pooled_l_dim=8)
    CacheInfo(identity={"t5": True}, layout=layout).save(root)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, (h, w) in enumerate(buckets_px):
            key = f"{i:04d}"
            tensors = {
                "mean": torch.full((16, h // 8, w // 8), float(i), dtype=torch.bfloat16),
                "logvar": torch.zeros(16, h // 8, w // 8, dtype=torch.bfloat16),
                "context": torch.zeros(81, 8, dtype=torch.bfloat16),
                "pooled": torch.zeros(8, dtype=torch.bfloat16),
            }
            meta = {"caption": key, "bucket": [h, w], "crop_top_left": [0, 0]}
            meta["original_size"] = [h, w]
            for name, data in (
                (f"{key}.safetensors", encode_tensors(tensors)),
                (f"{key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "000000.tar").write_bytes(buf.getvalue())


def test_a_multi_resolution_cache_batches_each_family_at_its_size(tmp_path):
    _latent_cache(tmp_path, [(32, 32), (48, 48)] * 6)
    cfg = DataConfig(
        cache_shards=str(tmp_path), resolution=32, resolutions=(32, 48), num_workers=0,
        shuffle_buffer=1, max_bad_fraction=1.0,
    )  # fmt: skip
    sizes = {b.bucket: b.mean.shape[0] for b in take(build_loader(cfg, 0, 1, batch_size=4), 4)}
    assert sizes == {(32, 32): 4, (48, 48): 1}  # 4 x (32/48)**2 = 1.8 -> 1
    # A cache sample in a bucket of no family: one line naming the fix.
    _latent_cache(tmp_path, [(64, 64)])
    with pytest.raises(ValueError, match="precompute the cache with this run's data section"):
        take(build_loader(cfg, 0, 1, batch_size=4), 1)
