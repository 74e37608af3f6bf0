"""Scaling ladders: compute-matched expansion, file checks and the dry-look table (no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdit.flops import approx_train_flops_per_sample, param_counts
from mmdit.typed_config import ConfigError, load
from slurm import ladder as ladder_mod
from slurm.ladder import budget_name, expand, load_ladder, table
from training.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
CPU = REPO / "configs" / "scaling" / "ladder_cpu.yaml"
CLUSTER = REPO / "configs" / "scaling" / "ladder_cluster.yaml"
DEBUG = REPO / "configs" / "debug_cpu.yaml"


def _write(tmp_path, body: str) -> Path:
    path = tmp_path / "ladder.yaml"
    path.write_text(f"base: {DEBUG}\nrun_root: runs/x\n{body}")
    return path


def _spent(rung) -> float:
    return rung.steps * rung.global_batch * rung.flops_per_sample


@pytest.mark.parametrize("path", [CPU, CLUSTER], ids=["cpu", "cluster"])
def test_shipped_ladders_are_compute_matched(path):
    rungs = expand(load_ladder(path), include_skipped=True)
    assert rungs and any(not r.skipped for r in rungs)
    for r in rungs:
        per_step = r.global_batch * r.flops_per_sample
        assert r.budget_flops <= _spent(r) < r.budget_flops + per_step, r.name
        assert r.params == param_counts(r.config.model)["total"]
        assert r.config.model.depth == r.depth and r.config.model.hidden_size == 64 * r.depth
        assert r.config.train.max_steps == r.steps and r.config.train.run_dir == r.run_dir
        assert r.run_dir.endswith(f"/d{r.depth}_{r.budget_name}") and r.name in r.run_dir
        assert r.config.train.warmup_steps == r.warmup <= max(1, r.steps // 10)
        assert r.world_size == r.config.launch.nodes * r.config.launch.gpus_per_node
        assert r.train_flops == _spent(r)


def test_cpu_rungs_are_tiny_and_their_overrides_rebuild_the_config():
    ladder = load_ladder(CPU)
    rungs = expand(ladder)
    assert {r.depth for r in rungs} == set(ladder.depths) and len(rungs) == 6
    for r in rungs:
        assert 10 <= r.steps <= 150, (r.name, r.steps)
        assert r.config.data.resolution == 32 and r.config.model.sample_size == 4
        # 32 px -> 4x4 latents -> 2x2 patches; CLIP 77 + T5 77 text tokens.
        assert r.flops_per_sample == approx_train_flops_per_sample(r.config.model, 4, 154)
        assert load(RunConfig, ladder.base, r.overrides) == r.config
        assert r.run_dir.startswith("runs/")
    d1 = next(r for r in rungs if r.depth == 1)
    assert d1.global_batch == 16 * 2  # per_depth micro batch x 2 CPU tasks


def test_checkpoints_are_evenly_spaced_and_all_kept():
    for r in expand(load_ladder(CLUSTER)):
        every, steps = r.config.train.checkpoint_every, r.steps
        saved = len(range(every, steps + 1, every)) + (steps % every != 0)
        assert saved <= 20 and saved >= min(steps, 19)
        assert r.config.train.keep_checkpoints >= saved + r.config.launch.max_requeues


def test_cluster_ladder_spans_d2_to_d38_with_many_nodes_for_the_big_ones():
    rungs = expand(load_ladder(CLUSTER), include_skipped=True)
    assert {r.depth for r in rungs} >= {2, 15, 18, 21, 30, 38}
    nodes = {r.depth: r.config.launch.nodes for r in rungs}
    assert nodes[38] >= 16 and nodes[30] >= 16 and nodes[2] == 1
    kept = [r for r in rungs if not r.skipped]
    assert {r.depth for r in kept} == {r.depth for r in rungs}  # every size runs somewhere
    assert all(2000 <= r.steps <= 200_000 for r in kept)
    assert {r.config.data.resolution for r in rungs} == {256}


def test_rungs_outside_the_step_range_are_skipped_and_say_why(tmp_path):
    path = _write(tmp_path, "depths: [1, 2, 3]\nbudgets: [3.0e11]\nmin_steps: 30\nmax_steps: 100\n")
    ladder = load_ladder(path)
    everything = {r.depth: r for r in expand(ladder, include_skipped=True)}
    d1, d2, d3 = everything[1], everything[2], everything[3]
    # At 128 px this budget is ~370 steps of d1, ~57 of d2 and ~19 of d3.
    assert d1.skipped == f"{d1.steps} steps > max_steps=100" and d1.steps > 100
    assert 30 <= d2.steps <= 100 and not d2.skipped
    assert d3.skipped == f"{d3.steps} steps < min_steps=30" and d3.steps < 30
    assert [r.name for r in expand(ladder)] == ["d2_3e11"]


def test_warmup_keeps_the_base_value_when_it_fits(tmp_path):
    path = _write(tmp_path, "depths: [1]\nbudgets: [1.0e12]\nmax_warmup_fraction: 0.5\n")
    (rung,) = expand(load_ladder(path))
    assert rung.steps > 40 and rung.warmup == 20  # debug_cpu.yaml's warmup_steps


def test_base_is_relative_to_the_ladder_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text(f"base: {DEBUG}\ntrain:\n  lr: 1.0e-3\n")
    path = tmp_path / "ladder.yaml"
    path.write_text("base: sub/run.yaml\nrun_root: r\ndepths: [2]\nbudgets: [1.0e11]\n")
    (rung,) = expand(load_ladder(path))
    assert rung.config.train.lr == 1e-3 and rung.run_dir == "r/d2_1e11"


@pytest.mark.parametrize(
    "body, message",
    [
        ("depth: [2]\nbudgets: [1.0e11]\n", "unknown key 'depth'; did you mean 'depths'?"),
        ("depths: [2]\nbudgets: [1.0e11]\nmin_step: 3\n", "unknown key 'min_step'"),
        ("budgets: [1.0e11]\n", "'depths' is required"),
        ("depths: [2]\nbudgets: [1.0e11]\nper_depth: {4: {launch.nodes: 2}}\n", "depth(s) [4]"),
        ("depths: [2, 2]\nbudgets: [1.0e11]\n", "must be distinct"),
        ("depths: [2]\nbudgets: [0]\n", "must be positive"),
        ("depths: [2]\nbudgets: [1.0e11, 1.0001e11]\n", "repeat a name"),
        ("depths: [2]\nbudgets: [1.0e11]\noverrides: {train.max_steps: 5}\n", "'train.max_steps'"),
        (
            "depths: [2]\nbudgets: [1.0e11]\nper_depth: {2: {model.depth: 3}}\n",
            "per_depth.2: 'model.depth' is set by the ladder",
        ),
    ],
)
def test_bad_ladder_files_name_the_problem(tmp_path, body, message):
    with pytest.raises(ConfigError) as exc:
        load_ladder(_write(tmp_path, body))
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "body, message",
    [
        ("overrides: {train.lrr: 1.0}", "ladder rung d2: override 'train.lrr=1.0': unknown key"),
        ("overrides: {model.hidden_size: 64}", "not 64 x depth = 128"),
        ("overrides: {train.global_batch_size: 12}", "not a multiple of micro_batch_size x"),
    ],
)
def test_bad_overrides_name_the_rung(tmp_path, body, message):
    ladder = load_ladder(_write(tmp_path, f"depths: [2]\nbudgets: [1.0e11]\n{body}\n"))
    with pytest.raises(ConfigError) as exc:
        expand(ladder)
    assert message in str(exc.value)


def test_budget_names():
    assert [budget_name(b) for b in (1e18, 3e19, 2.5e20, 1.5e11, 1000.0)] == [
        "1e18",
        "3e19",
        "2.5e20",
        "1.5e11",
        "1e3",
    ]


def test_main_prints_the_table(capsys):
    assert ladder_mod.main([str(CPU)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("rung"))
    for column in ("depth", "params", "budget", "steps", "samples", "est. FLOPs", "run dir"):
        assert column in header
    assert "d3_3e11" in out and "runs/scaling/cpu/d1_1.5e11" in out
    assert "6 of 6 rungs to run" in out
    assert table([]).startswith("rung")


def test_main_rejects_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ladder_mod.main([str(tmp_path / "nope.yaml")])
    assert exc.value.code == 2 and "nope.yaml' not found" in capsys.readouterr().err


def test_submission_is_a_loop_over_rung_overrides():
    for rung in expand(load_ladder(CPU)):
        assert f"model.depth={rung.depth}" in rung.overrides
        assert f"train.run_dir={rung.run_dir}" in rung.overrides
        assert all("=" in o and " " not in o for o in rung.overrides)
