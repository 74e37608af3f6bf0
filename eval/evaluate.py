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
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from data_pipeline.eval_samples import shard_mode
from data_pipeline.held_out_loss import held_out_loss
from eval.image_metrics import fid_prompts_and_reference, generate_images, image_metrics
from eval.loading import conditioning_of, pick_device
from eval.settings import EvalSettings, add_setting_flags, resolve_settings, settings_id
from eval.table import (
    missing_metrics,
    read_table,
    row_key,
    row_order,
    updated_row,
    write_table,
)
from mmdit import distributed
from mmdit.checkpoints import (
    MANIFEST,
    CheckpointError,
    checkpoints_dir,
    is_training_checkpoint,
    read_run_config,
    resolve_checkpoint,
    run_checkpoints,
)
from mmdit.conditioning import DTYPES, load_text_encoders, load_vae
from mmdit.typed_config import ConfigError
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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class Evaluator:
    """What the checkpoints share, loaded once: the device, the frozen components, the FID / CLIP
    feature models and the reference set; evaluate() computes one checkpoint's metrics."""

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
            row.update(
                image_metrics(images, prompts, ref_stats, settings, gen, self.inception, self.clip)
            )
        return row


def _val_needs_text(settings: EvalSettings, wanted: list[str]) -> bool:
    return "val_loss" in wanted and shard_mode(settings.eval.val_shards) == "images"


def run(args: argparse.Namespace) -> list[dict]:
    """Evaluate every target the arguments name, writing the table after each; its rows."""
    env = distributed.detect()
    distributed.init_process_group(env)
    evaluator = Evaluator(args, env)
    weights_kinds = _checked_choices(args, evaluator.metrics)
    targets = expand_targets(args.checkpoints, weights_kinds, args.latest_only)
    out_dir = Path(args.out)
    rows = {row_key(r): r for r in read_table(out_dir)}
    if not targets:
        raise CheckpointError("--checkpoints names nothing to evaluate")
    settings = _settings_of(targets[0], args)
    # Missing feature-extractor weights fail here, before any image is generated.
    evaluator.feature_models(settings)
    for n, target in enumerate(targets, 1):
        row = _evaluate_target(evaluator, target, rows, settings, (n, len(targets)))
        if row is None:
            continue
        rows[row_key(row)] = row
        if env.rank == 0:
            write_table(out_dir, list(rows.values()))
        distributed.barrier()
    if env.rank == 0 and not (out_dir / "table.json").is_file():
        write_table(out_dir, list(rows.values()))
    return sorted(rows.values(), key=row_order)


def _checked_choices(args: argparse.Namespace, metrics: list[str]) -> list[str]:
    """The --weights kinds, after checking them and the --metrics against what exists."""
    bad = [m for m in metrics if m not in METRICS]
    weights_kinds = [w.strip() for w in args.weights.split(",") if w.strip()]
    if bad or not metrics:
        raise CheckpointError(f"--metrics {args.metrics!r}: choose from {', '.join(METRICS)}")
    if not weights_kinds or any(w not in WEIGHTS for w in weights_kinds):
        raise CheckpointError(f"--weights {args.weights!r}: choose from {', '.join(WEIGHTS)}")
    return weights_kinds


def _settings_of(first: Target, args: argparse.Namespace) -> EvalSettings:
    """The settings of the whole evaluation: the command line over the first checkpoint's run
    config (none for an exported model)."""
    run_config = read_run_config(first.spec) if first.weights != "exported" else {}
    return resolve_settings(args, run_config, first.spec)


def _evaluate_target(
    evaluator: Evaluator,
    target: Target,
    rows: dict,
    settings: EvalSettings,
    position: tuple[int, int],
) -> dict | None:
    """The target's updated row, or None when the table already has all its metrics."""
    # A row's key is what load_weights reports as source and weights: decided before the
    # (for raw ZeRO-3 weights, costly) load, so a resumed evaluation skips for free.
    row = rows.get((target.spec, target.weights))
    todo = missing_metrics(row, evaluator.metrics, settings)
    if not todo:
        log.info("[%d/%d] %s (%s): already in the table", *position, target.spec, target.weights)
        return None
    weights = load_weights(target.spec, ema=target.weights == "ema")
    log.info(
        "[%d/%d] %s (%s weights, step %s): %s",
        *position,
        weights.source,
        weights.weights,
        weights.step,
        ", ".join(todo),
    )
    values = evaluator.evaluate(weights, settings, todo)
    return updated_row(row, weights, values, todo)


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
