"""mmdit-eval's FID and CLIP score of generated images: the prompts and reference set, this
rank's share of the generated images, and the scores over all ranks' images in prompt order."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from data_pipeline.cache_format import CACHE_INFO
from data_pipeline.eval_samples import eval_batches, shard_mode
from data_pipeline.tar_samples import expand_shards
from eval.settings import EvalSettings, settings_id
from mmdit import distributed
from mmdit.checkpoints import CheckpointError
from mmdit.sampling import sample_prompts, to_uint8

log = logging.getLogger("mmdit-eval")


def fid_prompts_and_reference(settings: EvalSettings) -> tuple[list[str], dict, object]:
    """(all prompts in order, the reference's cache key, a callable yielding reference uint8
    batches) for the FID / CLIP reference set."""
    from eval.fid import load_image_folder

    reference, n, size = (
        settings.eval.fid_reference,
        settings.eval.fid_samples,
        settings.eval.fid_size,
    )
    if not reference:
        raise CheckpointError("fid needs a reference: pass --fid-reference or set eval.val_shards")
    path = Path(reference)
    if path.is_dir() and not (path / CACHE_INFO).is_file() and not any(path.glob("*.tar")):
        if not settings.fid_prompts:
            raise CheckpointError(
                f"--fid-reference {reference} is an image folder: pass --fid-prompts FILE (one "
                "prompt per line) for the images to generate"
            )
        lines = Path(settings.fid_prompts).read_text().splitlines()
        prompts = [p.strip() for p in lines if p.strip()][:n]
        files = sorted(p for p in path.iterdir() if p.is_file())
        key = {"folder": str(path.resolve()), "files": [(f.name, f.stat().st_size) for f in files]}
        return (
            prompts,
            {**key, "size": size, "limit": n},
            lambda: load_image_folder(path, size, n),
        )
    data = dataclasses.replace(
        settings.data,
        resolution=size,
        max_aspect_ratio=1.0,  # one square bucket: every image size - size
    )
    if shard_mode(reference) != "images":
        raise CheckpointError(
            f"--fid-reference {reference}: cache shards hold latents, not images; give the raw "
            "image shards (or an image folder)"
        )

    def items():
        return eval_batches(data, reference, mode="images", batch_size=32, limit=n)

    prompts = [c for held_out in items() for c in held_out.batch.captions]
    urls = expand_shards(reference)
    stat = [(u, os.path.getsize(u), int(os.path.getmtime(u))) for u in urls if os.path.exists(u)]
    key = {"shards": stat, "size": size, "limit": n, "caption": data.caption}

    def images():
        for held_out in items():
            images = to_uint8(held_out.batch.images)
            yield torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    return prompts, key, images


def generate_images(model, vae, text_encoders, prompts, settings, env, device, dtype):
    """This rank's contiguous share of the generated images, as {index: uint8 (3, H, W)}.
    Image i uses noise seed eval.sample_seed + i (mmdit.sampling seeds prompt j of a call with
    seed + j), so the images do not depend on the number of ranks or the batch."""
    n, ev = len(prompts), settings.eval
    share = range(n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size)
    start = time.monotonic()

    def progress(done: int) -> None:
        rate = done / max(time.monotonic() - start, 1e-9)
        log.info(
            "generated %d/%d images on rank %d (%.2f img/s, ETA %.0f s)",
            done,
            len(share),
            env.rank,
            rate,
            (len(share) - done) / max(rate, 1e-9),
        )

    pixels = sample_prompts(
        model,
        vae,
        text_encoders,
        prompts[share.start : share.stop],
        height=ev.fid_size,
        width=ev.fid_size,
        seed=ev.sample_seed + share.start,
        steps=ev.sample_steps,
        cfg_scale=ev.cfg_scale,
        shift=ev.shift,
        batch_size=settings.batch_size,
        device=device,
        dtype=dtype,
        on_batch=progress,
    )
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    return dict(zip(share, images, strict=True))


def image_metrics(images, prompts, ref_stats, settings, gen, inception, clip) -> dict:
    """The row's FID and/or CLIP columns (gen) over every rank's generated images, gathered
    back into prompt order: images is this rank's share, {index: uint8 (3, H, W)}."""
    from eval.fid import frechet_distance, statistics

    order = sorted(images)
    stacked = torch.stack([images[i] for i in order]) if order else None
    local: dict = {"indices": order}
    if "fid" in gen and stacked is not None:
        local["features"] = inception(stacked)
    if "clip" in gen and stacked is not None:
        local["clip"] = clip.scores(stacked, [prompts[i] for i in order])
    parts = distributed.gather_objects(local)
    row: dict = {"fid_samples": len(prompts), "sample_seed": settings.eval.sample_seed}
    index = [i for p in parts for i in p["indices"]]
    position = sorted(range(len(index)), key=index.__getitem__)
    if "fid" in gen:
        features = torch.cat([p["features"] for p in parts if "features" in p])[position]
        row["fid"] = frechet_distance(ref_stats, statistics(features))
        row["fid_settings"] = settings_id(settings, "fid")
        log.info("FID %.4f over %d generated images", row["fid"], features.shape[0])
    if "clip" in gen:
        scores = torch.cat([p["clip"] for p in parts if "clip" in p])[position]
        row["clip_score"] = float(scores.mean())
        row["clip_settings"] = settings_id(settings, "clip")
        log.info("CLIP score %.4f over %d images", row["clip_score"], scores.shape[0])
    return row
