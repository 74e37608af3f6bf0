"""Loader throughput per core: JPEG decode + bucket crop (ours vs plain webdataset + PIL), and
precompute-cache shards.

    python bench/data.py                       # generated shards, ~1-2 min, one core
    python bench/data.py --samples 512 --out bench/results/data_cpu.json

Everything runs in this one process with torch.set_num_threads(1), so rates are per core. The
JPEG shards hold real photos (scikit-image / matplotlib samples) upscaled to 1024x768-ish sizes
in several aspect ratios, as web-scraped data looks after img2dataset. The plain pipeline is
what people write by hand: wds.WebDataset(...).decode("pil"), resize to cover with PIL bicubic,
centre crop, to tensor. Both read the same shards, alternating passes, best-of-N rates.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.cache_format import CacheInfo, CacheLayout, encode_tensors
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader

SIZES = [(1024, 768), (768, 1024), (1024, 1024), (1280, 720), (896, 1152)]


def _photos() -> list[Image.Image]:
    from matplotlib import cbook
    from skimage import data

    images = [
        Image.fromarray(getattr(data, n)()).convert("RGB")
        for n in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        images.append(Image.open(f).convert("RGB"))
    return images


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_jpeg_shards(root: Path, samples: int, per_shard: int) -> list[str]:
    photos = _photos()
    encoded = []
    for i, (w, h) in enumerate(SIZES):
        buf = io.BytesIO()
        photos[i % len(photos)].resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
    urls = []
    for shard in range((samples + per_shard - 1) // per_shard):
        path = root / f"{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{shard:04d}{i:05d}"
                _add(tar, f"{key}.jpg", encoded[(shard * per_shard + i) % len(encoded)])
                _add(tar, f"{key}.txt", b"a photo for the benchmark")
        urls.append(str(path))
    return urls


def write_cache_shards(root: Path, samples: int, per_shard: int, latent: int) -> None:
    layout = CacheLayout(
        clip_length=77, clip_l_dim=768, clip_g_dim=1280, t5_length=77, pooled_l_dim=768
    )
    CacheInfo(identity={"bench": True}, layout=layout).save(root)
    g = torch.Generator().manual_seed(0)
    record = encode_tensors(
        {
            "mean": torch.randn(16, latent, latent, generator=g).bfloat16(),
            "logvar": torch.randn(16, latent, latent, generator=g).bfloat16(),
            "context": torch.randn(154, 4096, generator=g).bfloat16(),
            "pooled": torch.randn(2048, generator=g).bfloat16(),
        }
    )
    for shard in range((samples + per_shard - 1) // per_shard):
        with tarfile.open(root / f"{shard:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:04d}{i:05d}"
                meta = {
                    "key": key,
                    "caption": "c",
                    "bucket": [latent * 8] * 2,
                    "crop_top_left": [0, 0],
                    "original_size": [latent * 8] * 2,
                }
                _add(tar, f"{key}.safetensors", record)
                _add(tar, f"{key}.json", json.dumps(meta).encode())


def ours_rate(config: DataConfig, samples: int, batch: int) -> float:
    loader = build_loader(config, 0, 1, batch_size=batch)
    start, seen = time.perf_counter(), 0
    for b in loader:
        seen += len(b)
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def plain_rate(urls: list[str], samples: int, resolution: int) -> float:
    import webdataset as wds

    def transform(sample):
        img = sample["jpg"].convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        img = img.resize(
            (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC
        )
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 127.5 - 1
        return x, sample["txt"]

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    start, seen = time.perf_counter(), 0
    for sample in dataset:
        transform(sample)
        seen += 1
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="samples per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes per pipeline (best-of)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="bench/results/data_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results: dict = {"jpeg": {}, "cache": {}}
    with tempfile.TemporaryDirectory() as tmp:
        jpeg_dir, cache_dir = Path(tmp) / "jpeg", Path(tmp) / "cache"
        jpeg_dir.mkdir()
        cache_dir.mkdir()
        print("writing shards ...", flush=True)
        urls = write_jpeg_shards(jpeg_dir, args.samples, per_shard=64)
        for resolution in (256, 512):
            cfg = DataConfig(
                shards=str(jpeg_dir),
                resolution=resolution,
                num_workers=0,
                shuffle_buffer=16,
                max_bad_fraction=1.0,
            )
            ours, plain = [], []
            for r in range(args.repeats):  # alternate so drift hits both alike
                ours.append(ours_rate(cfg, args.samples, args.batch))
                plain.append(plain_rate(urls, args.samples, resolution))
                print(
                    f"{resolution}px pass {r + 1}/{args.repeats}: ours {ours[-1]:.0f}/s, "
                    f"plain webdataset+PIL {plain[-1]:.0f}/s",
                    flush=True,
                )
            results["jpeg"][str(resolution)] = {
                "ours_samples_per_s": max(ours),
                "plain_samples_per_s": max(plain),
                "ours_median": statistics.median(ours),
                "plain_median": statistics.median(plain),
                "ratio_ours_over_plain": max(ours) / max(plain),
            }
        for resolution in (256, 512):
            sub = cache_dir / str(resolution)
            sub.mkdir()
            write_cache_shards(sub, args.samples * 4, per_shard=256, latent=resolution // 8)
            cfg = DataConfig(
                cache_shards=str(sub), num_workers=0, shuffle_buffer=16, max_bad_fraction=1.0
            )
            rates = [ours_rate(cfg, args.samples * 4, args.batch) for _ in range(args.repeats)]
            print(f"cache {resolution}px: {max(rates):.0f} samples/s", flush=True)
            results["cache"][str(resolution)] = {
                "samples_per_s": max(rates),
                "median": statistics.median(rates),
            }

    out = {
        "benchmark": "data_loader_per_core",
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": 1,
        },
        "settings": vars(args),
        "jpeg_sizes": SIZES,
        **results,
        "targets": {"jpeg_512_per_core": 100, "cache_per_core": 1000, "jpeg_vs_plain": ">= 1.0"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("jpeg", "cache")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
