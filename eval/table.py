"""mmdit-eval's results table: one row per (checkpoint, weights), kept as table.json and
table.csv in the output directory, and which metrics a row already holds for the current
settings (so an interrupted or extended evaluation resumes where it stopped)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

from data_pipeline.config import DataConfig
from eval.loading import run_config_of
from eval.settings import EvalSettings, settings_id
from mmdit.atomic_file import write_atomic
from mmdit.checkpoints import CheckpointError, read_manifest
from mmdit.conditioning import ConditioningConfig
from mmdit.flops import param_counts, train_flops_per_sample
from mmdit.typed_config import from_dict
from mmdit.weights import Weights

# The column that holds each metric's value; its settings are in "<metric>_settings".
METRIC_COLUMNS = {"val_loss": "val_loss", "fid": "fid", "clip": "clip_score"}


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


def _section(config: Mapping, name: str, cls, source: str):
    return from_dict(cls, config.get(name) or {}, source=f"{source}: {name}")


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


def _is_column_of(column: str, metrics: list[str]) -> bool:
    """Whether a table column belongs to one of these metrics (dropped before recomputing them,
    so no value from other settings survives next to the new ones)."""
    prefixes = {"val_loss": ("val_",), "fid": ("fid",), "clip": ("clip_",)}
    return any(column.startswith(p) for m in metrics for p in prefixes[m])


def missing_metrics(row: Mapping | None, metrics: list[str], settings: EvalSettings) -> list[str]:
    """The requested metrics this row lacks, or has from other settings."""
    out = []
    for m in metrics:
        value = None if row is None else row.get(METRIC_COLUMNS[m])
        fresh = row is not None and row.get(f"{m}_settings") == settings_id(settings, m)
        if value is None or (isinstance(value, float) and math.isnan(value)) or not fresh:
            out.append(m)
    return out


def updated_row(row: Mapping | None, weights: Weights, values: dict, recomputed: list[str]):
    """The old row (if any) with the recomputed metrics' columns replaced by the new values."""
    kept = {k: v for k, v in (row or {}).items() if not _is_column_of(k, recomputed)}
    return {**kept, **describe(weights), **values}
