"""Fixtures building test shards from real photographs (skimage / matplotlib sample data).

`faulty_shards` is written with `tarfile` directly (not our writer) and holds one planted fault
per sample; EXPECTED_FAULTY gives the exact counts a correct reader must report for it.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.data_pipeline.image_bytes import encode

QUALITY = {"JPEG": {"quality": 90}, "WEBP": {"quality": 90}}

# (source photo, size (w, h), stored format): several aspect ratios, all three formats.
PHOTOS = (
    ("astronaut", (96, 64), "JPEG"),
    ("coffee", (64, 128), "PNG"),
    ("chelsea", (160, 90), "WEBP"),
    ("camera", (80, 80), "JPEG"),
    ("grace_hopper", (72, 120), "PNG"),
)
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _photo(name: str) -> Image.Image:
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


@dataclass(frozen=True)
class Photo:
    name: str
    size: tuple[int, int]
    ext: str
    data: bytes
    caption: str


@pytest.fixture(scope="session")
def photos() -> list[Photo]:
    out = []
    for name, size, fmt in PHOTOS:
        img = _photo(name).resize(size, Image.BICUBIC)
        out.append(
            Photo(
                name, size, EXT[fmt], encode(img, fmt, **QUALITY.get(fmt, {})), f"a photo of {name}"
            )
        )
    return out


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return buf.getvalue()


def member_offsets(tar_bytes: bytes) -> dict[str, tuple[int, int, int]]:
    """name -> (header offset, data offset, size)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


def good_members(key: str, photo: Photo) -> list[tuple[str, bytes]]:
    meta = {"key": key, "width": photo.size[0], "height": photo.size[1], "caption": photo.caption}
    return [
        (f"{key}.{photo.ext}", photo.data),
        (f"{key}.txt", photo.caption.encode()),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


class _Payload:
    """Unpickling this creates `path` (stand-in for arbitrary code execution)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


@dataclass(frozen=True)
class FaultyShards:
    dir: Path
    urls: list[str]
    marker: Path
    truncated_good_keys: list[str]  # complete samples before the cut in the truncated shard


# Exact counts for `faulty_shards` (iter_samples + parse_sample + decode_image).
EXPECTED_FAULTY = {
    "good": 5,
    "corrupt_image": 1,
    "missing_image": 1,
    "missing_caption": 1,
    "empty_caption": 1,
    "bad_json": 1,
    "forbidden_member": 1,
    "unsafe_key": 1,
    "truncated_tar": 1,
    "unreadable_shard": 0,
    "too_small": 0,
}
EXPECTED_FAULTY_SAMPLES = 10  # samples yielded by iter_samples (the unsafe one is not)


@pytest.fixture(scope="session")
def faulty_shards(tmp_path_factory, photos) -> FaultyShards:
    root = tmp_path_factory.mktemp("faulty")
    d = root / "shards"
    d.mkdir()
    marker = root / "PWNED"
    p = photos
    cut_jpg = p[0].data[: len(p[0].data) // 2]
    shard0 = [
        *good_members("s0_good1", p[0]),
        ("s0_corrupt.jpg", cut_jpg),
        ("s0_corrupt.txt", b"half a jpeg"),
        (f"s0_nocap.{p[1].ext}", p[1].data),
        ("s0_nocap.json", b'{"width": 64}'),
        (f"s0_emptycap.{p[2].ext}", p[2].data),
        ("s0_emptycap.txt", b"  \n "),
        (f"s0_badjson.{p[3].ext}", p[3].data),
        ("s0_badjson.txt", b"bad json"),
        ("s0_badjson.json", b'{"width": 80,'),
        (f"s0_pickle.{p[4].ext}", p[4].data),
        ("s0_pickle.txt", b"has a pickle"),
        ("s0_pickle.pyd", pickle_payload(marker)),
        ("s0_pickle.extra.pkl", pickle_payload(marker)),
        (f"../evil.{p[0].ext}", p[0].data),
        ("../evil.txt", b"escape"),
        ("s0_noimage.txt", b"caption without image"),
        *good_members("s0_good2", p[1]),
    ]
    (d / "000000.tar").write_bytes(make_tar(shard0))
    shard1 = [
        *good_members("s1_good3", p[2]),
        *good_members("s1_good4", p[3]),
        *good_members("s1_cut", p[4]),
    ]
    full = make_tar(shard1)
    _, data_off, size = member_offsets(full)[f"s1_cut.{p[4].ext}"]
    (d / "000001.tar").write_bytes(full[: data_off + size // 2])  # cut mid-member
    return FaultyShards(d, [str(d / "000000.tar"), str(d / "000001.tar")], marker,
                        ["s1_good3", "s1_good4"])  # fmt: skip


@pytest.fixture(scope="session")
def img2dataset_dir(tmp_path_factory, photos) -> Path:
    """Shards laid out like img2dataset output: 00000.tar + 00000.parquet + 00000_stats.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    d = tmp_path_factory.mktemp("img2dataset")
    rows = []
    for shard_id, chunk in enumerate((photos[:3], photos[3:])):
        with wds.TarWriter(str(d / f"{shard_id:05d}.tar")) as tw:
            for i, ph in enumerate(chunk):
                key = f"{shard_id * 10000 + i:09d}"
                meta = {
                    "url": f"https://example.com/{ph.name}.jpg",
                    "caption": ph.caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": ph.size[0],
                    "height": ph.size[1],
                    "original_width": ph.size[0] * 4,
                    "original_height": ph.size[1] * 4,
                    "exif": "{}",
                    "sha256": "0" * 64,
                }
                rows.append(meta)
                tw.write(
                    {
                        "__key__": key,
                        "jpg": ph.data,  # img2dataset always names it jpg (png/webp still decode)
                        "txt": ph.caption,
                        "json": json.dumps(meta, indent=4),
                    }
                )
        pq.write_table(pa.Table.from_pylist(rows[-len(chunk) :]), d / f"{shard_id:05d}.parquet")
        (d / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": len(chunk)}))
    return d
