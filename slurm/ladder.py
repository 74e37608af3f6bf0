"""Scaling ladders: a grid of model depths x compute budgets, one compute-matched run per rung.

    python -m slurm.ladder configs/scaling/ladder_cpu.yaml        # print the rungs, run nothing
    python -m slurm.ladder configs/scaling/ladder_cluster.yaml
    mmdit-submit --ladder configs/scaling/ladder_cluster.yaml      # submit every rung

A ladder file (YAML; keys below, unknown keys are errors) names one run file that every rung
starts from and turns it into rung d{depth}_{budget} with dotted overrides:

  base: ../d24_256px.yaml   # the run file every rung starts from (relative to the ladder file)
  run_root: runs/scaling    # rung run directories: {run_root}/d{depth}_{budget}
  depths: [2, 4, 6]         # model.depth of each size (hidden 64*d, d heads)
  budgets: [1.0e18, 1.0e19] # training FLOPs per run
  overrides: {train.lr_schedule: constant}          # every rung (optional)
  per_depth: {6: {launch.nodes: 2}}                 # one size only (optional)
  checkpoints: 10           # evenly spaced checkpoints per run: the points of its curve
  min_steps: 1000           # rungs needing fewer steps are skipped (and listed as such)
  max_steps: 0              # rungs needing more steps are skipped; 0 = no limit
  max_warmup_fraction: 0.1  # warmup is clipped to this fraction of a rung's steps

Compute matching: steps = ceil(budget / (flops_per_sample x global_batch)), so every run of a
budget spends that budget (at most one step more). FLOPs per sample are the trainer's
(mmdit.flops.train_flops_per_sample); the global batch is train.global_batch_size, or the
micro batch x launch.nodes x launch.gpus_per_node when that is 0. Every rung keeps all of its
evenly spaced checkpoints (train.keep_checkpoints covers them plus one per possible requeue),
so mmdit-eval can evaluate each one for the scaling curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.scaling_plots import human_count
from mmdit.flops import param_counts, train_flops_per_sample
from mmdit.typed_config import ConfigError, from_dict, load, parse_yaml
from training.config import RunConfig
from training.ds_config import global_batch

log = logging.getLogger(__name__)

# Keys the ladder derives for every rung; setting them in `overrides` or `per_depth` would
# silently break compute matching or the run directory layout, so it is refused.
DERIVED_KEYS = (
    "model.depth",
    "train.max_steps",
    "train.run_dir",
    "train.checkpoint_every",
    "train.keep_checkpoints",
)
REQUIRED_KEYS = ("base", "run_root", "depths", "budgets")


@dataclass(frozen=True)
class Ladder:
    """A ladder file, as loaded (base resolved against the ladder file's folder)."""

    # Required; the empty defaults only let an unknown key be reported before a missing one.
    base: str = ""
    run_root: str = ""
    depths: tuple[int, ...] = ()
    budgets: tuple[float, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    per_depth: dict[int, dict[str, Any]] = field(default_factory=dict)
    checkpoints: int = 10
    min_steps: int = 0
    max_steps: int = 0
    max_warmup_fraction: float = 0.1

    def __post_init__(self):
        missing = [name for name in REQUIRED_KEYS if not getattr(self, name)]
        if missing:
            raise ValueError(
                f"'{missing[0]}' is required; a ladder names base, run_root, depths and "
                "budgets (see configs/scaling/ladder_cpu.yaml)"
            )
        if min(self.depths) < 1 or len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths={list(self.depths)} must be distinct integers >= 1")
        if min(self.budgets) <= 0:
            raise ValueError(f"budgets={list(self.budgets)} must be positive FLOP counts")
        names = [budget_name(b) for b in self.budgets]
        if len(set(names)) != len(names):
            raise ValueError(
                f"budgets {names} repeat a name (3 significant digits name a run directory); "
                "make the budgets differ in their first 3 digits"
            )
        stray = sorted(set(self.per_depth) - set(self.depths))
        if stray:
            raise ValueError(
                f"per_depth names depth(s) {stray} that are not in depths={list(self.depths)}; "
                "add them to depths or remove them"
            )
        if self.checkpoints < 1 or self.min_steps < 0 or self.max_steps < 0:
            raise ValueError("checkpoints must be >= 1; min_steps and max_steps >= 0")
        if not 0.0 <= self.max_warmup_fraction <= 1.0:
            raise ValueError(f"max_warmup_fraction={self.max_warmup_fraction} must be in [0, 1]")


@dataclass(frozen=True)
class Rung:
    """One run of the ladder: its size, its budget and the overrides that make it."""

    name: str  # d{depth}_{budget_name}, also the run directory's name
    depth: int
    params: int
    budget_name: str
    budget_flops: float
    flops_per_sample: int
    global_batch: int
    world_size: int  # launch.nodes x launch.gpus_per_node
    steps: int
    warmup: int
    checkpoint_every: int
    run_dir: str
    overrides: list[str]  # dotted overrides turning the ladder's base run file into this rung
    config: RunConfig  # base + overrides, validated
    skipped: str = ""  # why this rung is not run ("" = it is)

    @property
    def samples(self) -> int:
        return self.steps * self.global_batch

    @property
    def train_flops(self) -> float:
        return float(self.samples * self.flops_per_sample)


# -- loading ----------------------------------------------------------------------------------


def load_ladder(path: str | Path) -> Ladder:
    """Read and check a ladder file; `base` is returned resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"ladder file '{path}' not found; pass one such as configs/scaling/ladder_cpu.yaml"
        )
    data = parse_yaml(path.read_text(), str(path))  # not read_file: `base` is no parent here
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a ladder file is a mapping of keys (see slurm/ladder.py)")
    ladder = from_dict(Ladder, data, source=str(path))
    for where, mapping in _override_sections(ladder):
        _refuse_derived(mapping, f"{path}: {where}")
    return dataclasses.replace(ladder, base=os.path.normpath(path.parent / ladder.base))


def _override_sections(ladder: Ladder):
    yield "overrides", ladder.overrides
    for depth, mapping in ladder.per_depth.items():
        yield f"per_depth.{depth}", mapping


def _refuse_derived(mapping: Mapping[str, Any], where: str) -> None:
    for key in mapping:
        if key in DERIVED_KEYS:
            raise ConfigError(
                f"{where}: '{key}' is set by the ladder for every rung (from depths, budgets, "
                "run_root and checkpoints); remove it"
            )


def as_overrides(mapping: Mapping[str, Any]) -> list[str]:
    """{key: value} -> ['key=value']; values in JSON form, which the override parser reads."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in mapping.items()]


# -- expanding --------------------------------------------------------------------------------


def budget_name(flops: float) -> str:
    """1e18 -> '1e18', 3e19 -> '3e19', 2.5e20 -> '2.5e20': short, and safe in a path."""
    mantissa, _, exponent = f"{flops:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def _load_rung(ladder: Ladder, name: str, overrides: list[str]) -> RunConfig:
    try:
        return load(RunConfig, ladder.base, overrides)
    except ConfigError as e:
        raise ConfigError(f"ladder rung {name}: {e}") from None


def _shape(ladder: Ladder, depth: int) -> tuple[list[str], RunConfig]:
    """The overrides and config that fix one size, before any budget is applied."""
    overrides = [
        *as_overrides(ladder.overrides),
        *as_overrides(ladder.per_depth.get(depth, {})),
        f"model.depth={depth}",
    ]
    config = _load_rung(ladder, f"d{depth}", overrides)
    if config.model.hidden_size != 64 * depth:
        raise ConfigError(
            f"ladder rung d{depth}: model.hidden_size={config.model.hidden_size}, not "
            f"64 x depth = {64 * depth}; the ladder sizes models by depth, so remove "
            "model.hidden_size (and model.num_heads) from the base file and overrides"
        )
    return overrides, config


def _world_and_batch(config: RunConfig, name: str) -> tuple[int, int]:
    world = config.launch.nodes * config.launch.gpus_per_node
    try:
        return world, global_batch(config.train, world)
    except ValueError as e:
        raise ConfigError(f"ladder rung {name}: {e}") from None


def _skip_reason(ladder: Ladder, steps: int) -> str:
    if steps < ladder.min_steps:
        return f"{steps} steps < min_steps={ladder.min_steps}"
    if ladder.max_steps and steps > ladder.max_steps:
        return f"{steps} steps > max_steps={ladder.max_steps}"
    return ""


def make_rung(ladder: Ladder, depth: int, budget: float) -> Rung:
    """Rung d{depth}_{budget}: the steps that spend the budget and the overrides to run them."""
    shape_overrides, shaped = _shape(ladder, depth)
    name = f"d{depth}_{budget_name(budget)}"
    world, batch = _world_and_batch(shaped, name)
    per_sample = train_flops_per_sample(
        shaped.model, shaped.data.resolution, shaped.conditioning.t5_max_length
    )
    steps = max(1, math.ceil(budget / (per_sample * batch)))
    # Keep the base file's warmup where it fits, so rungs share it; a short rung gets at most
    # max_warmup_fraction of its steps, or its learning rate would never reach the peak.
    warmup = min(shaped.train.warmup_steps, int(ladder.max_warmup_fraction * steps))
    every = math.ceil(steps / ladder.checkpoints)  # ceil(steps / every) <= checkpoints saves
    run_dir = f"{ladder.run_root.rstrip('/')}/{name}"
    overrides = [
        *shape_overrides,
        f"train.max_steps={steps}",
        f"train.warmup_steps={warmup}",
        f"train.checkpoint_every={every}",
        # One extra checkpoint per requeue (written at preemption) must not evict a curve point.
        f"train.keep_checkpoints={max(2, ladder.checkpoints + shaped.launch.max_requeues)}",
        f"train.run_dir={run_dir}",
    ]
    return Rung(
        name=name,
        depth=depth,
        params=param_counts(shaped.model)["total"],
        budget_name=budget_name(budget),
        budget_flops=budget,
        flops_per_sample=per_sample,
        global_batch=batch,
        world_size=world,
        steps=steps,
        warmup=warmup,
        checkpoint_every=every,
        run_dir=run_dir,
        overrides=overrides,
        config=_load_rung(ladder, name, overrides),
        skipped=_skip_reason(ladder, steps),
    )


def expand(ladder: Ladder, *, include_skipped: bool = False) -> list[Rung]:
    """The ladder's rungs to run, by depth then budget.

    Rungs outside [min_steps, max_steps] are left out (logged) unless include_skipped, which
    returns them too with `skipped` saying why. Submitting a ladder is a loop over this list:
    `mmdit-submit --config ladder.base <rung.overrides...>` for each rung.
    """
    rungs = [make_rung(ladder, d, b) for d in ladder.depths for b in ladder.budgets]
    for rung in rungs:
        if rung.skipped:
            log.info("skipping ladder rung %s: %s", rung.name, rung.skipped)
    return rungs if include_skipped else [r for r in rungs if not r.skipped]


# -- the dry look -----------------------------------------------------------------------------


COLUMNS = ("rung", "depth", "params", "budget", "steps", "warmup", "batch", "gpus", "samples")


def table(rungs: Sequence[Rung]) -> str:
    """A fixed-width table of the rungs: size, budget, schedule, resources and run dir."""
    header = [*COLUMNS, "est. FLOPs", "run dir", "note"]
    rows = [header]
    for r in rungs:
        rows.append(
            [
                r.name,
                str(r.depth),
                human_count(r.params),
                f"{r.budget_flops:.3g}",
                str(r.steps),
                str(r.warmup),
                str(r.global_batch),
                f"{r.config.launch.nodes}x{r.config.launch.gpus_per_node}",
                human_count(r.samples),
                f"{r.train_flops:.3g}",
                r.run_dir,
                f"skipped: {r.skipped}" if r.skipped else "",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    return argparse.ArgumentParser(
        prog="python -m slurm.ladder",
        description=doc[0],
        epilog="\n\n".join(doc[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("ladder", metavar="FILE", help="ladder file, e.g. configs/scaling/*.yaml")
    args = parser.parse_args(argv)
    try:
        ladder = load_ladder(args.ladder)
        rungs = expand(ladder, include_skipped=True)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"ladder {args.ladder}: base run file {ladder.base}")
    print(table(rungs))
    runnable = sum(not r.skipped for r in rungs)
    total = sum(r.train_flops for r in rungs if not r.skipped)
    print(f"{runnable} of {len(rungs)} rungs to run, {total:.3g} training FLOPs in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
