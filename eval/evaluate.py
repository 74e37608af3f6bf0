"""`mmdit-eval`: checkpoints -> one tidy table of validation loss, FID and CLIP score.

    mmdit-eval --checkpoints runs/d12 runs/d18 --metrics val_loss --weights ema,raw \\
        --components /models/sd3 --out runs/eval
    torchrun --nproc_per_node 8 -m eval.evaluate --checkpoints runs/d24:250000 \\
        --metrics val_loss,fid,clip --inception-weights /models/pt_inception.pth \\
        --clip-checkpoint /models/open_clip_vit_l14.bin --out runs/eval

Checkpoints (--checkpoints, several allowed): a run directory means every published
checkpoint of that run (--latest-only: only its newest); RUN:STEP or a step directory means
that one; a diffusers folder or .safetensors export is evaluated as "exported" weights.
--weights picks the EMA and/or the trained ("raw") weights of training checkpoints.

Metrics (--metrics):
  val_loss  SD3-style validation loss on the held-out shards (eval.val_shards, raw or cache):
            the first --val-samples samples, each at --sigma-bins fixed sigmas with fixed noise
            (see mmdit/val_loss.py); columns val_loss and val_loss_bin_<k>
  fid       FID (torch-fidelity's InceptionV3) of --fid-samples generated images against the
            reference: shards (their captions are the prompts, their centre crops the
            reference images) or an image folder with --fid-prompts FILE; reference statistics
            are cached on disk, keyed by the data and the feature extractor
  clip      CLIP score (open_clip, 100 * max(cos, 0), mean over the same generated images)
Settings not given on the command line come from the first checkpoint's run config (eval and
data sections); --set SECTION.KEY=VALUE reaches any eval.* or data.* field (eval/settings.py).
Every row records the settings it was computed with.

Output (--out DIR): table.csv and table.json, one row per (checkpoint, weights) with run,
model, depth, params, step, samples_seen, train_flops, weights and the metrics. Rows already
in the table with the same settings are kept and not recomputed, so an interrupted or extended
evaluation resumes where it stopped. Under torchrun or srun, the held-out samples and the
generated images are split over the ranks; rank 0 writes the table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from data_pipeline.cache_format import CACHE_INFO
from data_pipeline.config import DataConfig
from data_pipeline.eval_samples import eval_batches, shard_mode
from data_pipeline.held_out_loss import held_out_loss
from data_pipeline.tar_samples import expand_shards
from eval.loading import conditioning_of, pick_device, run_config_of
from eval.settings import EvalSettings, add_setting_flags, resolve_settings, settings_id
from mmdit import distributed
from mmdit.atomic_file import write_atomic
from mmdit.checkpoints import (
    MANIFEST,
    CheckpointError,
    checkpoints_dir,
    is_training_checkpoint,
    read_manifest,
    read_run_config,
    resolve_checkpoint,
    run_checkpoints,
)
from mmdit.conditioning import DTYPES, ConditioningConfig, load_text_encoders, load_vae
from mmdit.flops import param_counts, train_flops_per_sample
from mmdit.sampling import sample_prompts, to_uint8
from mmdit.typed_config import ConfigError, from_dict
from mmdit.weights import Weights, load_weights

log = logging.getLogger("mmdit-eval")

METRICS = ("val_loss", "fid", "clip")
WEIGHTS = ("ema", "raw")


# --------------------------------------------------------------------------------------------
# What to evaluate
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # what load_weights reads
    weights: str  # "ema", "raw" or "exported"


def expand_targets(specs: Iterable[str], weights: Iterable[str], latest_only: bool) -> list[Target]:
    out: list[Target] = []
    for spec in specs:
        if not is_training_checkpoint(spec):
            out.append(Target(str(Path(spec).resolve()), "exported"))
            continue
        path = Path(spec)
        whole_run = checkpoints_dir(path).is_dir() and not (path / MANIFEST).is_file()
        if whole_run and not latest_only:
            step_dirs = run_checkpoints(path)
            if not step_dirs:
                raise CheckpointError(f"{spec}: the run has no published checkpoints yet")
        else:
            step_dirs = [resolve_checkpoint(spec)]
        out += [Target(str(d.resolve()), w) for d in step_dirs for w in weights]
    return out


def _section(config: Mapping, name: str, cls, source: str):
    return from_dict(cls, config.get(name) or {}, source=f"{source}: {name}")


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def row_key(row: Mapping) -> tuple[str, str]:
    return str(row["checkpoint"]), str(row["weights"])


def read_table(out_dir: Path) -> list[dict]:
    path = out_dir / "table.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise CheckpointError(f"{path} is not a table written by mmdit-eval (expected a list)")
    return rows


def row_order(row: Mapping) -> tuple:
    return str(row["run"]), row["step"] or 0, str(row["weights"])


def write_table(out_dir: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=row_order)
    write_atomic(out_dir / "table.json", json.dumps(rows, indent=1, default=str) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not isinstance(row[k], (dict, list))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_atomic(out_dir / "table.csv", buf.getvalue())


def describe(weights: Weights) -> dict:
    """The columns that place a row on a scaling plot: size, step, data and compute seen."""
    config = run_config_of(weights)
    params = param_counts(weights.config)["total"]
    row: dict = {
        "run": weights.run_dir.name if weights.run_dir else Path(weights.source).name,
        "model": f"d{weights.config.depth}",
        "depth": weights.config.depth,
        "hidden_size": weights.config.hidden_size,
        "params": params,
        "step": weights.step,
        "weights": weights.weights,
        "checkpoint": weights.source,
        "samples_seen": None,
        "train_flops": None,
    }
    if config:
        src = weights.source
        data = _section(config, "data", DataConfig, src)
        cond = _section(config, "conditioning", ConditioningConfig, src)
        train = config.get("train") or {}
        world = read_manifest(src).get("world_size", 1)
        batch = train.get("global_batch_size") or train.get("micro_batch_size", 1) * world
        row["samples_seen"] = int(weights.step) * int(batch)
        per_sample = train_flops_per_sample(weights.config, data.resolution, cond.t5_max_length)
        row["train_flops"] = float(row["samples_seen"]) * per_sample
    return row


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def compute_val_loss(model, vae, text_encoders, settings, env, device, dtype) -> dict:
    ev = settings.eval
    if not ev.val_shards:
        raise CheckpointError(
            "val_loss needs held-out shards: pass --val-shards or set eval.val_shards"
        )
    result = held_out_loss(
        model,
        settings.data,
        ev.val_shards,
        vae,
        text_encoders,
        samples=ev.val_samples,
        bins=ev.sigma_bins,
        noise_seed=ev.noise_seed,
        batch_size=settings.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        gather=distributed.gather_objects,
        device=device,
        dtype=dtype,
    )
    return {
        **result.as_row(),
        "val_noise_seed": result.noise_seed,
        "val_bad_samples": result.bad_samples,
    }


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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class Evaluator:
    def __init__(self, args: argparse.Namespace, env):
        self.args, self.env = args, env
        self.device = pick_device(args.device)
        self.dtype_name = args.dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        self.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        self.inception = self.clip = None
        self.reference = None  # (prompts, FidStatistics or None)
        self._components: dict = {}

    def feature_models(self, settings: EvalSettings):
        from eval.clip_score import ClipScorer
        from eval.fid import InceptionFeatures, find_inception_weights

        if "fid" in self.metrics and self.inception is None:
            path = find_inception_weights(settings.eval.inception_weights or None)
            self.inception = InceptionFeatures(path, device=self.device)
        if "clip" in self.metrics and self.clip is None:
            self.clip = ClipScorer(
                settings.eval.clip_model,
                settings.eval.clip_checkpoint,
                device=self.device,
                pretrained_tag=settings.eval.clip_pretrained_tag or None,
            )

    def components(self, cond, needs_text: bool):
        """(VAE, text encoders or None), loaded once per conditioning setup: the checkpoints of
        a run share theirs."""
        if self._components.get("cond") != cond:
            self._components = {"cond": cond, "vae": load_vae(cond, self.device)}
        if needs_text and "text" not in self._components:
            self._components["text"] = load_text_encoders(cond, self.device)
        return self._components["vae"], self._components.get("text")

    def reference_stats(self, settings: EvalSettings):
        from eval.fid import reference_statistics

        if self.reference is None:
            prompts, key, images = fid_prompts_and_reference(settings)
            stats = None
            if "fid" in self.metrics:
                if self.env.rank == 0:
                    stats = reference_statistics(
                        images,
                        data_key=key,
                        extractor=self.inception,
                        cache_dir=self.args.cache_dir,
                    )
                stats = distributed.broadcast_object(stats)
            self.reference = (prompts, stats)
        return self.reference

    def evaluate(self, weights: Weights, settings: EvalSettings, wanted: list[str]) -> dict:
        device, dtype = self.device, DTYPES[self.dtype_name]
        cond = conditioning_of(weights, self.args.components, self.dtype_name)
        model = weights.model(device, dtype)
        needs_text = "fid" in wanted or "clip" in wanted or _val_needs_text(settings, wanted)
        vae, text_encoders = self.components(cond, needs_text)
        row: dict = {}
        if "val_loss" in wanted:
            t0 = time.monotonic()
            row.update(
                compute_val_loss(model, vae, text_encoders, settings, self.env, device, dtype)
            )
            row["val_loss_settings"] = settings_id(settings, "val_loss")
            log.info(
                "val_loss %.5f (%d samples, %.0f s)",
                row["val_loss"],
                row["val_samples"],
                time.monotonic() - t0,
            )
        gen = [m for m in ("fid", "clip") if m in wanted]
        if gen:
            self.feature_models(settings)
            prompts, ref_stats = self.reference_stats(settings)
            images = generate_images(
                model, vae, text_encoders, prompts, settings, self.env, device, dtype
            )
            row.update(self._image_metrics(images, prompts, ref_stats, settings, gen))
        return row

    def _image_metrics(self, images, prompts, ref_stats, settings, gen) -> dict:
        from eval.fid import frechet_distance, statistics

        order = sorted(images)
        stacked = torch.stack([images[i] for i in order]) if order else None
        local: dict = {"indices": order}
        if "fid" in gen and stacked is not None:
            local["features"] = self.inception(stacked)
        if "clip" in gen and stacked is not None:
            local["clip"] = self.clip.scores(stacked, [prompts[i] for i in order])
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


def _val_needs_text(settings: EvalSettings, wanted: list[str]) -> bool:
    return "val_loss" in wanted and shard_mode(settings.eval.val_shards) == "images"


def _is_column_of(column: str, metrics: list[str]) -> bool:
    """Whether a table column belongs to one of these metrics (dropped before recomputing them,
    so no value from other settings survives next to the new ones)."""
    prefixes = {"val_loss": ("val_",), "fid": ("fid",), "clip": ("clip_",)}
    return any(column.startswith(p) for m in metrics for p in prefixes[m])


def missing_metrics(row: Mapping | None, metrics: list[str], settings: EvalSettings) -> list[str]:
    """The requested metrics this row lacks, or has from other settings."""
    column = {"val_loss": "val_loss", "fid": "fid", "clip": "clip_score"}
    out = []
    for m in metrics:
        value = None if row is None else row.get(column[m])
        fresh = row is not None and row.get(f"{m}_settings") == settings_id(settings, m)
        if value is None or (isinstance(value, float) and math.isnan(value)) or not fresh:
            out.append(m)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    env = distributed.detect()
    distributed.init_process_group(env)
    evaluator = Evaluator(args, env)
    bad = [m for m in evaluator.metrics if m not in METRICS]
    weights_kinds = [w.strip() for w in args.weights.split(",") if w.strip()]
    if bad or not evaluator.metrics:
        raise CheckpointError(f"--metrics {args.metrics!r}: choose from {', '.join(METRICS)}")
    if not weights_kinds or any(w not in WEIGHTS for w in weights_kinds):
        raise CheckpointError(f"--weights {args.weights!r}: choose from {', '.join(WEIGHTS)}")
    targets = expand_targets(args.checkpoints, weights_kinds, args.latest_only)
    out_dir = Path(args.out)
    rows = {row_key(r): r for r in read_table(out_dir)}
    if not targets:
        raise CheckpointError("--checkpoints names nothing to evaluate")
    first = targets[0]
    run_config = read_run_config(first.spec) if first.weights != "exported" else {}
    settings = resolve_settings(args, run_config, first.spec)
    # Missing feature-extractor weights fail here, before any image is generated.
    evaluator.feature_models(settings)
    for n, target in enumerate(targets, 1):
        # A row's key is what load_weights reports as source and weights: decided before the
        # (for raw ZeRO-3 weights, costly) load, so a resumed evaluation skips for free.
        row = rows.get((target.spec, target.weights))
        todo = missing_metrics(row, evaluator.metrics, settings)
        if not todo:
            log.info(
                "[%d/%d] %s (%s): already in the table",
                n,
                len(targets),
                target.spec,
                target.weights,
            )
            continue
        weights = load_weights(target.spec, ema=target.weights == "ema")
        log.info(
            "[%d/%d] %s (%s weights, step %s): %s",
            n,
            len(targets),
            weights.source,
            weights.weights,
            weights.step,
            ", ".join(todo),
        )
        values = evaluator.evaluate(weights, settings, todo)
        kept = {k: v for k, v in (row or {}).items() if not _is_column_of(k, todo)}
        merged = {**kept, **describe(weights), **values}
        rows[row_key(merged)] = merged
        if env.rank == 0:
            write_table(out_dir, list(rows.values()))
        distributed.barrier()
    if env.rank == 0 and not (out_dir / "table.json").is_file():
        write_table(out_dir, list(rows.values()))
    return sorted(rows.values(), key=row_order)


def build_parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog="mmdit-eval",
        description=parts[0],
        epilog="\n\n".join(parts[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH")
    p.add_argument("--metrics", default="val_loss", help="comma list of val_loss, fid, clip")
    p.add_argument("--weights", default="ema", help="comma list of ema, raw (default ema)")
    p.add_argument("--out", required=True, metavar="DIR", help="table.csv / table.json go here")
    p.add_argument("--latest-only", action="store_true", help="a run's newest checkpoint only")
    p.add_argument("--components", metavar="DIR", help="SD3-layout frozen components")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    g = add_setting_flags(p)
    g.add_argument(
        "--cache-dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "mmdit", "fid"),
        help="reference statistics cache (default ~/.cache/mmdit/fid)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    from eval.fid import InvalidWeightsError, MissingWeightsError

    try:
        rows = run(args)
    except (CheckpointError, ConfigError, MissingWeightsError, InvalidWeightsError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if distributed.detect().rank == 0:
        out = Path(args.out)
        print(f"{len(rows)} rows in {out / 'table.csv'} and {out / 'table.json'}")
        for row in rows:
            values = "  ".join(
                f"{k}={row[k]:.4f}"
                for k in ("val_loss", "fid", "clip_score")
                if isinstance(row.get(k), float)
            )
            print(f"  {row['run']} step {row['step']} {row['weights']}: {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
