"""The training loader: slots partition each epoch, batches are one bucket, resume is exact."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.batches import ImageBatch, LatentBatch
from data_pipeline.cache_format import CacheInfo, CacheLayout, encode_tensors
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader, reshard_state, slot_shards
from mmdit.conditioning import StaleEmbeddingsError
from tests.data_pipeline.conftest import good_members, make_tar, pickle_payload

SHARDS, PER_SHARD = 8, 5


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, photos) -> Path:
    """8 shards x 5 real photos (3 formats, 5 aspect ratios) = 40 samples."""
    root = tmp_path_factory.mktemp("loader_shards")
    for s in range(SHARDS):
        members = []
        for i, photo in enumerate(photos):
            members += good_members(f"{s:02d}{i:03d}", photo)
        (root / f"{s:06d}.tar").write_bytes(make_tar(members))
    return root


def config(shards: Path | str, **overrides) -> DataConfig:
    base = dict(
        shards=str(shards),
        resolution=64,
        crop="random",
        shuffle_buffer=4,
        num_workers=0,
        seed=7,
        max_bad_fraction=1.0,
    )
    return DataConfig(**{**base, **overrides})


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_slots_partition_the_epoch_across_ranks_and_workers(shard_dir):
    seen = []
    for rank in (0, 1):
        loader = build_loader(config(shard_dir, num_workers=2), rank, 2, batch_size=1)
        # Each of this rank's 2 slots holds 2 shards = 10 samples; round-robin -> 20 batches.
        for batch in take(loader, 20):
            assert batch.epochs == [0]
            seen += batch.keys
    assert len(seen) == len(set(seen)) == SHARDS * PER_SHARD  # disjoint, union = the epoch


def test_shard_order_is_seeded_by_seed_and_epoch():
    shards = [f"s{i}" for i in range(12)]
    a = slot_shards(shards, epoch=0, slot=1, num_slots=3, seed=0, resample=False)
    assert a == slot_shards(shards, epoch=0, slot=1, num_slots=3, seed=0, resample=False)
    assert a != slot_shards(shards, epoch=1, slot=1, num_slots=3, seed=0, resample=False)
    union = sum(
        (
            slot_shards(shards, epoch=3, slot=s, num_slots=3, seed=0, resample=False)
            for s in range(3)
        ),
        [],
    )
    assert sorted(union) == sorted(shards)
    drawn = slot_shards(shards, epoch=0, slot=0, num_slots=3, seed=0, resample=True)
    assert len(drawn) == 4 and set(drawn) <= set(shards)


def test_batches_come_from_one_bucket_with_recorded_geometry(shard_dir, photos):
    sizes = {p.name: p.size for p in photos}
    by_caption = {p.caption: p.name for p in photos}
    for batch in take(build_loader(config(shard_dir), 0, 1, batch_size=2), 12):
        assert isinstance(batch, ImageBatch)
        h, w = batch.bucket
        assert h % 16 == 0 and w % 16 == 0
        assert batch.images.shape == (2, 3, h, w)
        assert batch.images.min() >= -1 and batch.images.max() <= 1
        for caption, (top, left), (oh, ow) in zip(
            batch.captions,
            batch.crop_top_left.tolist(),
            batch.original_size.tolist(),
            strict=True,
        ):
            assert (ow, oh) == sizes[by_caption[caption]]
            scale = max(w / ow, h / oh)  # resize to cover, crop inside the resized image
            assert 0 <= top <= round(oh * scale) - h and 0 <= left <= round(ow * scale) - w


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_exactly_the_next_batches(shard_dir, num_workers):
    cfg = config(shard_dir, num_workers=num_workers)
    n_before, n_after = 17, 10  # 20 samples per slot per epoch: this crosses an epoch end
    reference = take(build_loader(cfg, 0, 1, batch_size=2), n_before + n_after)
    assert {e for b in reference for e in b.epochs} == {0, 1}

    interrupted = build_loader(cfg, 0, 1, batch_size=2)
    take(interrupted, n_before)
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain data, as in a checkpoint
    assert state == interrupted.state_dict()  # already JSON's form (refs as lists), not tuples

    resumed = build_loader(cfg, 0, 1, batch_size=2)
    resumed.load_state_dict(state)
    for ref, got in zip(reference[n_before:], take(resumed, n_after), strict=True):
        assert got.keys == ref.keys and got.epochs == ref.epochs
        assert torch.equal(got.images, ref.images)
        assert torch.equal(got.crop_top_left, ref.crop_top_left)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_are_the_same_typed_batches_in_page_locked_memory(shard_dir):
    cfg = config(shard_dir, num_workers=1)
    reference = take(build_loader(cfg, 0, 1, batch_size=2), 3)
    pinned = take(build_loader(cfg, 0, 1, batch_size=2, pin_memory=True), 3)
    for ref, got in zip(reference, pinned, strict=True):
        assert isinstance(got, ImageBatch) and got.keys == ref.keys
        assert got.images.is_pinned() and got.crop_top_left.is_pinned()
        assert torch.equal(got.images, ref.images)


def test_iterating_again_continues_instead_of_restarting(shard_dir):
    cfg = config(shard_dir)
    reference = take(build_loader(cfg, 0, 1, batch_size=1), 6)
    loader = build_loader(cfg, 0, 1, batch_size=1)
    first, second = take(loader, 3), take(loader, 3)
    assert [b.keys for b in first + second] == [b.keys for b in reference]


def test_resume_with_another_layout_is_refused(shard_dir):
    loader = build_loader(config(shard_dir), 0, 1, batch_size=1)
    take(loader, 2)
    other = build_loader(config(shard_dir, num_workers=2), 0, 1, batch_size=1)
    with pytest.raises(ValueError, match="num_workers: saved 1, now 2"):
        other.load_state_dict(loader.state_dict())


def _states(loaders) -> list[dict]:
    return [json.loads(json.dumps(lo.state_dict())) for lo in loaders]


def test_two_ranks_continue_exactly_as_one_rank_with_two_workers(shard_dir):
    # The trainer's 2 -> 1 world-size change at a fixed global batch: 2 ranks x 1 worker
    # become 1 rank x 2 workers, whose round-robin interleaves the two old streams.
    cfg = config(shard_dir, num_workers=1)
    ranks = [build_loader(cfg, r, 2, batch_size=2) for r in range(2)]
    for lo in ranks:
        take(lo, 5)
    states = _states(ranks)
    continued = [take(lo, 4) for lo in ranks]
    merged = build_loader(dataclasses.replace(cfg, num_workers=2), 0, 1, batch_size=2)
    merged.load_state_dict(reshard_state(states, 0, 1, 2))
    got = take(merged, 8)
    expected = [continued[i % 2][i // 2] for i in range(8)]
    for g, e in zip(got, expected, strict=True):
        assert g.keys == e.keys and torch.equal(g.images, e.images)


def test_one_rank_with_two_workers_continues_exactly_as_two_ranks(shard_dir):
    cfg = config(shard_dir, num_workers=2)
    single = build_loader(cfg, 0, 1, batch_size=2)
    take(single, 6)  # an even count: each worker consumed 3, a step boundary for 2 ranks
    (state,) = _states([single])
    continued = take(single, 6)
    split = []
    for r in range(2):
        lo = build_loader(dataclasses.replace(cfg, num_workers=1), r, 2, batch_size=2)
        lo.load_state_dict(reshard_state([state], r, 2, 1))
        split.append(take(lo, 3))
    expected = [split[i % 2][i // 2] for i in range(6)]
    assert [b.keys for b in continued] == [b.keys for b in expected]


def test_reshard_to_another_reader_count_is_refused(shard_dir):
    loader = build_loader(config(shard_dir, num_workers=1), 0, 2, batch_size=1)
    take(loader, 1)
    other = _states([loader, build_loader(config(shard_dir, num_workers=1), 1, 2, batch_size=1)])
    with pytest.raises(ValueError, match="data.num_workers = 2 / world size"):
        reshard_state(other, 0, 1, 1)


def test_too_few_shards_for_the_readers_is_explained(shard_dir):
    with pytest.raises(ValueError, match="8 shards for 16 readers"):
        build_loader(config(shard_dir, num_workers=4), 0, 4, batch_size=1)
    build_loader(config(shard_dir, num_workers=4, resample=True), 0, 4, batch_size=1)


def faulty_shards(root: Path, photos, marker: Path) -> Path:
    good = photos[0]
    for s in range(2):
        members = good_members(f"g{s}0", good) + good_members(f"g{s}1", photos[1])
        if s == 1:  # good samples first, then a corrupt image, a missing caption, a pickle
            members += [(f"bad0.{good.ext}", good.data[: len(good.data) // 2]), ("bad0.txt", b"x")]
            members += [(f"bad1.{good.ext}", good.data)]
            members += good_members("pkl", photos[2]) + [("pkl.pyd", pickle_payload(marker))]
        (root / f"{s:06d}.tar").write_bytes(make_tar(members))
    return root


def until_epoch_1(loader) -> list[str]:
    keys = []
    for batch in loader:
        if batch.epochs == [1]:
            return keys
        keys += batch.keys
    raise AssertionError("unreachable: the stream is infinite")


def test_bad_samples_are_skipped_counted_and_never_unpickled(tmp_path, photos):
    marker = tmp_path / "pwned"
    shards = faulty_shards(tmp_path, photos, marker)
    loader = build_loader(config(shards, shuffle_buffer=1), 0, 1, batch_size=1)
    assert sorted(until_epoch_1(loader)) == ["g00", "g01", "g10", "g11", "pkl"]
    counts = loader.bad_counts()
    assert counts["corrupt_image"] == 1 and counts["missing_caption"] == 1
    # 5 good samples in epoch 0, plus the epoch-1 batch that ended the loop (also consumed).
    assert counts["forbidden_member"] == 1 and counts["good"] == 6
    assert not marker.exists()


def test_resume_inside_a_shard_does_not_count_its_bad_samples_twice(tmp_path, photos):
    shards = faulty_shards(tmp_path, photos, tmp_path / "pwned")
    cfg = config(shards, shuffle_buffer=1)
    reference = build_loader(cfg, 0, 1, batch_size=1)
    until_epoch_1(reference)

    interrupted = build_loader(cfg, 0, 1, batch_size=1)
    for batch in interrupted:
        if batch.keys == ["pkl"]:  # its .pyd member was just counted; shard not finished
            break
    resumed = build_loader(cfg, 0, 1, batch_size=1)
    resumed.load_state_dict(interrupted.state_dict())
    until_epoch_1(resumed)
    assert resumed.bad_counts() == reference.bad_counts()


def test_too_many_bad_samples_abort_with_the_counts(tmp_path, photos):
    members = []
    for i in range(120):
        members += [(f"{i:04d}.jpg", b"not a jpeg"), (f"{i:04d}.txt", b"caption")]
    members += good_members("last", photos[0])
    (tmp_path / "000000.tar").write_bytes(make_tar(members))
    loader = build_loader(config(tmp_path, max_bad_fraction=0.5), 0, 1, batch_size=1)
    with pytest.raises(RuntimeError, match=r"corrupt_image=\d+.*data.max_bad_fraction"):
        take(loader, 1)


# --- latents mode --------------------------------------------------------------------------


def _cache(root: Path, identity: dict) -> None:
    layout = CacheLayout(
        clip_length=77, clip_l_dim=32, clip_g_dim=40, t5_length=4, pooled_l_dim=768
    )
    CacheInfo(identity=identity, layout=layout).save(root)
    for s in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(3):
                key = f"{s}{i:03d}"
                h, w = (4, 6) if i % 2 else (6, 4)
                tensors = {
                    "mean": torch.full((16, h, w), float(i), dtype=torch.bfloat16),
                    "logvar": torch.zeros(16, h, w, dtype=torch.bfloat16),
                    "context": torch.randn(81, 4096).bfloat16(),
                    "pooled": torch.randn(2048).bfloat16(),
                }
                meta = {
                    "key": key,
                    "caption": f"c{key}",
                    "bucket": [h * 8, w * 8],
                    "crop_top_left": [0, 0],
                    "original_size": [h * 8, w * 8],
                }
                for name, data in (
                    (f"{key}.safetensors", encode_tensors(tensors)),
                    (f"{key}.json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (root / f"{s:06d}.tar").write_bytes(buf.getvalue())


def test_latents_mode_batches_cached_tensors_by_bucket(tmp_path):
    identity = {"components": {"vae": {"config_sha256": "abc"}}, "t5": True}
    _cache(tmp_path, identity)
    cfg = dataclasses.replace(config(""), cache_shards=str(tmp_path))
    loader = build_loader(cfg, 0, 1, batch_size=2, expected_identity=identity)
    assert loader.cache_info.layout.clip_l_dim == 32
    for batch in take(loader, 4):
        assert isinstance(batch, LatentBatch)
        h, w = batch.bucket
        assert batch.mean.shape == (2, 16, h // 8, w // 8)
        assert batch.context.shape == (2, 81, 4096) and batch.pooled.shape == (2, 2048)
        assert batch.mean.dtype == torch.bfloat16


def test_latents_mode_refuses_a_cache_from_other_encoders(tmp_path):
    _cache(tmp_path, {"components": {"vae": {"config_sha256": "abc"}}, "t5": True})
    cfg = dataclasses.replace(config(""), cache_shards=str(tmp_path))
    other = {"components": {"vae": {"config_sha256": "def"}}, "t5": True}
    with pytest.raises(StaleEmbeddingsError, match="components"):
        build_loader(cfg, 0, 1, batch_size=2, expected_identity=other)


# --- shards that vanish while the run reads ------------------------------------------------


def test_a_shard_deleted_mid_run_is_retried_counted_and_the_rest_read(tmp_path, shard_dir):
    """A real worker process reads; one shard is deleted while it is open (Linux keeps an open
    file readable: it is read whole) and one before it is reached (tried 3 times, 0.3 s apart,
    then counted as unreadable_shard and skipped); every other sample comes exactly once."""
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    cfg = config(shards, num_workers=1, shuffle_buffer=1, shard_retry_wait_s=0.3)
    assert cfg.shard_open_retries == 2  # the default
    order = slot_shards(
        sorted(str(p) for p in shards.glob("*.tar")),
        epoch=0,
        slot=0,
        num_slots=1,
        seed=cfg.seed,
        resample=False,
    )
    expected = {f"{Path(url).stem[-2:]}{i:03d}" for url in order for i in range(PER_SHARD)}
    gone = {f"{Path(order[-2]).stem[-2:]}{i:03d}" for i in range(PER_SHARD)}
    loader = build_loader(cfg, 0, 1, batch_size=1)
    batches = iter(loader)
    keys = next(batches).keys  # the worker is inside the first shard now
    Path(order[0]).unlink()
    Path(order[-2]).unlink()
    t0 = time.monotonic()
    for _ in range(len(expected) - len(gone) - 1):  # the rest of the epoch
        keys += next(batches).keys
    waited = time.monotonic() - t0
    assert sorted(keys) == sorted(expected - gone)  # nothing skipped, nothing twice
    counts = loader.bad_counts()
    assert counts["unreadable_shard"] == 1 and sum(counts.values()) - counts["good"] == 1
    assert waited >= 0.6, waited  # the two waits before it was given up
