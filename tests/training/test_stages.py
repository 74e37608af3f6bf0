"""Chained stages (training.stages) on the CPU twin of the SD3 recipe, configs/sd3_recipe_cpu.yaml:
2 stages (32 px, then 64 px from the first stage's final EMA), 2 gloo ranks, bf16, end to end
through a kill -9 in stage 2 and a rerun of the same command. Steps and batch are shrunk on the
command line (for both stages); each stage keeps its own resolution, position grid and lr.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdit.checkpoints import ema_state_dict, zero_state_dict
from mmdit.typed_config import ConfigError
from tests.training.conftest import losses, read_metrics, run_training, succeeded
from training.stages import load_stages

RECIPE = "configs/sd3_recipe_cpu.yaml"
STEPS = 4
FIRST, SECOND = "32px", "64px"


def _args(root: Path, digit_shards, tiny_components) -> list[str]:
    settings = {
        "train.run_dir": root,
        "data.shards": digit_shards,
        "conditioning.components": tiny_components,
        "data.num_workers": 1,
        "data.shuffle_buffer": 8,
        "train.max_steps": STEPS,
        "train.checkpoint_every": 2,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.log_every": 1,
    }
    return ["--config", RECIPE, *(f"{k}={v}" for k, v in settings.items())]


def _final(run: Path) -> Path:
    return run / "checkpoints" / f"step_{STEPS:08d}"


def test_the_recipe_resolves_one_config_per_stage(tmp_path):
    first, second = load_stages(RECIPE, [f"train.run_dir={tmp_path}"])
    assert (first.name, second.name) == (FIRST, SECOND)
    assert first.run_dir == tmp_path / FIRST and second.run_dir == tmp_path / SECOND
    assert first.config.train.init_from == ""
    assert second.config.train.init_from == f"{tmp_path / FIRST}:200"
    assert second.config.train.init_weights == "ema"
    assert (first.config.data.resolution, second.config.data.resolution) == (32, 64)
    assert (first.config.model.sample_size, second.config.model.sample_size) == (4, 8)
    assert first.config.model.same_weights_as(second.config.model.replace(sample_size=4))
    # Command-line overrides apply to every stage, after the stage's own keys.
    shrunk = load_stages(RECIPE, [f"train.run_dir={tmp_path}", "train.max_steps=3"])
    assert [s.config.train.max_steps for s in shrunk] == [3, 3]
    assert shrunk[1].config.train.init_from.endswith(f"{FIRST}:3")


def test_a_stage_cannot_move_its_run_directory_or_launch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - name: a\n  - name: b\n    overrides: {train.init_from: /w}\n")
    with pytest.raises(ConfigError, match="only the first stage may set it"):
        load_stages(bad)
    bad.write_text("stages:\n  - name: a\n    overrides: {launch.nodes: 2}\n")
    with pytest.raises(ConfigError, match="cannot be set per stage"):
        load_stages(bad)
    bad.write_text("stages:\n  - name: a\n    overrides: {train.mx_steps: 2}\n")
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        load_stages(bad)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digit_shards, tiny_components) -> tuple[Path, Path]:
    """(root, dumps): the uninterrupted chain; the dumps hold stage 2's weights (it ran last)."""
    base = tmp_path_factory.mktemp("chain")
    root, dumps = base / "run", base / "dumps"
    args = _args(root, digit_shards, tiny_components)
    succeeded(run_training(2, args, instruments={"MMDIT_TEST_DUMP_DIR": str(dumps)}, timeout=900))
    return root, dumps


@pytest.mark.distributed
@pytest.mark.slow
def test_stage_2_starts_from_stage_1s_final_ema(chain):
    root, dumps = chain
    start = load_file(str(dumps / "weights_0.safetensors"))  # stage 2's fp32 master weights
    ema = ema_state_dict(_final(root / FIRST))
    raw = zero_state_dict(_final(root / FIRST))
    assert sorted(start) == sorted(ema)
    for name, value in start.items():
        assert torch.equal(value, ema[name]), name
    assert any(not torch.equal(start[n], raw[n]) for n in start)  # the EMA, not the raw weights
    record = read_metrics(root / SECOND)[0]
    assert record["init_from"] == f"{root / FIRST}:{STEPS}" and record["weights"] == "ema"
    for stage in (FIRST, SECOND):
        assert sorted(losses(root / stage)) == list(range(1, STEPS + 1))
        assert (root / stage / "checkpoints" / "latest").read_text().strip() == _final(root).name


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_9_in_stage_2_then_the_same_command_skips_stage_1_and_resumes_stage_2(
    tmp_path, chain, digit_shards, tiny_components
):
    reference, _ = chain
    root = tmp_path / "run"
    args = _args(root, digit_shards, tiny_components)
    killed = run_training(
        2, args, instruments={"MMDIT_TEST_KILL_AFTER_STEP": f"3@{SECOND}"}, timeout=900
    )
    assert killed.returncode != 0
    assert _final(root / FIRST).is_dir() and max(losses(root / SECOND)) == 2

    rerun = succeeded(run_training(2, args, timeout=900))
    assert f"stage 1/2 {FIRST}" in rerun.stderr and "skipped" in rerun.stderr
    assert "resuming from" in rerun.stderr and "step_00000002" in rerun.stderr
    assert "initialising from" not in rerun.stderr  # stage 1 did not run, stage 2 resumed
    for stage in (FIRST, SECOND):
        assert losses(root / stage) == losses(reference / stage), stage

    again = succeeded(run_training(2, args, timeout=900))  # a finished chain: nothing to do
    assert again.stderr.count("skipped") == 2 * 2  # both stages, logged by both ranks
    assert "resuming from" not in again.stderr and "process group" not in again.stderr
