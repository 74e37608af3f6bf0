"""Chained training stages: SD3's schedule (256² -> 512² -> 1024²) as one command.

A run file with a top-level `stages:` list describes the chain; everything else in the file is
the configuration every stage shares, and each stage applies its own dotted keys on top:

    train:
      run_dir: runs/sd3_recipe
    stages:
      - name: 256px
        overrides: {data.resolution: 256, model.sample_size: 32, train.max_steps: 250000}
      - name: 512px
        overrides: {data.resolution: 512, model.sample_size: 64, train.max_steps: 50000}

    mmdit-train --config configs/sd3_recipe.yaml [section.key=value ...]

Command-line overrides apply to every stage, after the stage's own keys. Stage NAME trains in
TRAIN.RUN_DIR/NAME; every stage after the first starts from the previous stage's final weights
(train.init_from=PREVIOUS_RUN:MAX_STEPS, its EMA unless the stage sets train.init_weights=raw);
the first stage may set train.init_from itself (e.g. released weights to fine-tune).

Restartable at any point, on every rank of a torchrun/srun job, and so requeue-safe: on start,
a stage whose final checkpoint (step train.max_steps) is published is done and skipped, the
first unfinished stage resumes from its own checkpoints (train.init_from is then ignored) and
the chain goes on from there. A stage that ends with a status other than 0 (3 preempted, 4 a
rank hung or died, 5 storage; training.train) ends the chain with that status.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdit.checkpoints import available_steps, checkpoints_dir
from mmdit.typed_config import (
    ConfigError,
    apply_dotted,
    apply_overrides,
    from_dict,
    read_file,
)
from training.config import RunConfig

log = logging.getLogger("mmdit.stages")

STAGES_KEY = "stages"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Set by the chain, or the job's own (one allocation runs every stage): not per stage.
_CHAIN_KEYS = ("train.run_dir", "launch.")


@dataclass(frozen=True)
class Stage:
    name: str  # its run directory is TRAIN.RUN_DIR/NAME
    # Dotted keys of the run file (data.resolution: 512) applied on top of the shared ones.
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(
                f"stage name {self.name!r}: use letters, digits, '.', '_' or '-' (it names "
                "the stage's run directory)"
            )


@dataclass(frozen=True)
class StagesConfig:
    stages: tuple[Stage, ...]

    def __post_init__(self):
        if not self.stages:
            raise ValueError("'stages' is empty; list at least one stage or remove the key")
        names = [s.name for s in self.stages]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"stage names {twice} appear twice; each stage needs its own name")


@dataclass(frozen=True)
class StageRun:
    name: str
    config: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.run_dir)

    def finished(self) -> bool:
        """Its final checkpoint is published (what every rank reads the same way)."""
        steps = available_steps(checkpoints_dir(self.run_dir))
        return bool(steps) and steps[-1] >= self.config.train.max_steps


def has_stages(path: str | Path) -> bool:
    return STAGES_KEY in read_file(path)


def load_stages(path: str | Path, overrides: Sequence[str] = ()) -> list[StageRun]:
    """The resolved config of every stage of the run file at `path`, in order."""
    data = read_file(path)
    raw = data.pop(STAGES_KEY, None)
    if raw is None:
        raise ConfigError(f"{path}: no '{STAGES_KEY}' list; it is a plain run file")
    spec = from_dict(StagesConfig, {STAGES_KEY: raw}, source=str(path))
    shared = apply_overrides(RunConfig, data, overrides)
    root = from_dict(RunConfig, shared, source=f"{path} (shared keys)").train.run_dir
    out: list[StageRun] = []
    for i, stage in enumerate(spec.stages):
        source = f"{path}: stage {stage.name}"
        _check_stage_keys(stage.overrides, source, first=i == 0)
        merged = apply_dotted(RunConfig, data, stage.overrides, source)
        merged = apply_overrides(RunConfig, merged, overrides)
        chain: dict[str, Any] = {"train.run_dir": str(Path(root) / stage.name)}
        if out:
            previous = out[-1].config.train
            chain["train.init_from"] = f"{previous.run_dir}:{previous.max_steps}"
        merged = apply_dotted(RunConfig, merged, chain, source)
        out.append(StageRun(stage.name, from_dict(RunConfig, merged, source=source)))
    return out


def _check_stage_keys(keys: Mapping[str, Any], source: str, first: bool) -> None:
    for key in keys:
        if any(str(key) == k or str(key).startswith(k) for k in _CHAIN_KEYS):
            raise ConfigError(
                f"{source}: '{key}' cannot be set per stage (the chain puts each stage in "
                "TRAIN.RUN_DIR/NAME and runs every stage in one job); set it at the top level"
            )
        if key == "train.init_from" and not first:
            raise ConfigError(
                f"{source}: 'train.init_from' is set by the chain for every stage after the "
                "first (the previous stage's final weights); only the first stage may set it"
            )


def chain_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """What a job launcher (mmdit-submit) needs of a chain: the last stage's config (the
    largest resolution: its memory plan is the job's) with the chain's run directory."""
    from dataclasses import replace

    stages = load_stages(path, overrides)
    last = stages[-1].config
    return replace(last, train=replace(last.train, run_dir=str(stages[-1].run_dir.parent)))


def run_stages(stages: list[StageRun], *, stop_flag=None, on_fault=None) -> int:
    """Train the unfinished stages in order, in this process (every rank runs the same).
    0 when the last stage is done, else the first non-zero status of a stage."""
    from training.trainer import Trainer

    for i, stage in enumerate(stages, 1):
        what = f"stage {i}/{len(stages)} {stage.name} ({stage.run_dir})"
        if stage.finished():
            log.info("%s: done (final checkpoint at step %d); skipped", what, _max(stage))
            continue
        log.info("%s: training to step %d", what, _max(stage))
        trainer = Trainer(stage.config, stop_flag=stop_flag, on_fault=on_fault)
        try:
            code = trainer.fit()
        finally:
            _release(trainer)
            del trainer
            gc.collect()
        if code:
            log.warning("%s ended with status %d; the chain stops here", what, code)
            return code
    return 0


def _max(stage: StageRun) -> int:
    return stage.config.train.max_steps


def _release(trainer) -> None:
    """Free one stage's DeepSpeed engine (its hooks, buffers, optimizer) before the next
    stage builds its own; the process group stays, as every stage uses it."""
    import torch

    trainer.engine.destroy()
    for name in ("engine", "ema", "loader", "inputs", "validator", "previewer"):
        if hasattr(trainer, name):
            setattr(trainer, name, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
