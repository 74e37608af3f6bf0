"""Every shipped run file trains: each `configs/**/*.yaml` (for a scaling ladder: its base with
the overrides of its largest rung) is loaded, shrunk in size only, and trained for 2 steps on 2
ranks with everything else as shipped (precision, ZeRO stage, checkpointing, attention,
compile, optimizer, schedule, text dropout, validation); a chain of stages trains every stage,
each from the one before. A run file that cannot run is a failing test here, not a promise in
the README.

Shrunk: the model's depth and position grid, the resolution, the batch, the number of steps,
data workers, shuffle buffer and validation samples. Replaced: paths (run directory, data,
components), which point at this machine's test data; a file that trains from cache shards
gets the precomputed digit cache, one that encodes on the fly gets the raw digit shards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdit.typed_config import load
from slurm.ladder import expand, load_ladder
from tests.training.conftest import read_metrics, run_training
from training.config import RunConfig
from training.stages import chain_config, has_stages, load_stages

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
FILES = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))
SIZES = {
    "model.depth": 2,
    "model.sample_size": 4,  # 32 px / VAE 8: 4x4 latents
    "model.pos_embed_max_size": 8,
    "data.resolution": 32,
    "data.num_workers": 1,
    "data.shuffle_buffer": 8,
    "train.max_steps": 2,
    "train.micro_batch_size": 2,
    "train.global_batch_size": 4,  # 2 ranks x micro 2
    "eval.val_samples": 8,
}


def test_every_run_file_is_covered():
    assert {str(f) for f in FILES} >= {
        "configs/debug_cpu.yaml",
        "configs/demo_cpu.yaml",
        "configs/d24_256px.yaml",
        "configs/d24_512px.yaml",
        "configs/scaling/ladder_cluster.yaml",
        "configs/sd3_recipe.yaml",
        "configs/sd3_recipe_cpu.yaml",
    }


def _as_shipped(path: Path) -> tuple[Path, list[str]]:
    """The run file and the overrides that make it what a user runs (a ladder: its largest
    rung, which carries the most settings of its own)."""
    if "ladder" not in path.name:
        return REPO / path, []
    ladder = load_ladder(REPO / path)
    rung = max(expand(ladder, include_skipped=True), key=lambda r: (r.depth, r.budget_flops))
    return Path(ladder.base), [o for o in rung.overrides if not o.startswith("train.run_dir=")]


@pytest.mark.parametrize("path", FILES, ids=[str(f) for f in FILES])
def test_run_file_trains_two_steps_on_two_ranks(
    path, tmp_path, digit_shards, digit_cache, tiny_components
):
    base, rung = _as_shipped(path)
    stages = has_stages(base)
    # A chain of stages: its last stage (the largest resolution) decides the data source.
    shipped = chain_config(base, rung) if stages else load(RunConfig, base, rung)
    cached = bool(shipped.data.cache_shards)
    cache = f"{digit_cache}/{{000000..000007}}.tar"
    places = {
        "train.run_dir": tmp_path / "run",
        "conditioning.components": tiny_components,
        "data.shards": digit_shards,
        "data.cache_shards": cache if cached else "",
        "eval.val_shards": (cache if cached else digit_shards) if shipped.eval.val_shards else "",
    }
    overrides = [*rung, *(f"{k}={v}" for k, v in {**SIZES, **places}.items())]
    runs = len(load_stages(base, overrides)) if stages else 1
    result = run_training(2, ["--config", str(base), *overrides], timeout=600 * runs)
    assert result.returncode == 0, result.stderr[-4000:]

    # Every stage of a chain trains, in its own directory (the next from the one before).
    runs = (
        [(s.run_dir, s.config) for s in load_stages(base, overrides)]
        if stages
        else [(tmp_path / "run", load(RunConfig, base, overrides))]
    )
    for run_dir, config in runs:
        metrics = read_metrics(run_dir)
        assert max(metrics) == 2 and 0 < metrics[2]["loss"] < 100
        if config.eval.val_every and config.eval.val_shards:
            assert "val_loss" in metrics[0]  # the step-0 validation of the EMA ran
        # What trained is the shipped file with only these overrides (sizes derived from
        # them, such as the hidden size from the depth, follow).
        (checkpoint,) = (run_dir / "checkpoints").glob("step_*")
        assert load(RunConfig, checkpoint / "config.yaml") == config
    levers = f"levers: {shipped.train.precision}, ZeRO-{shipped.train.zero_stage}"
    assert levers in result.stderr
