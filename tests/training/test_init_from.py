"""train.init_from: weights-only starts from our runs (EMA or raw, RUN or RUN:STEP), diffusers
folders, SD3 single files and mmdit-export files, on real 2-rank DeepSpeed ZeRO-3 jobs.

One short source run (bf16, 4 steps, checkpoints at 2 and 4) serves every test. "Exactly the
source weights" is read from DeepSpeed's fp32 master weights right after initialisation
(instrumented_train.py MMDIT_TEST_DUMP_DIR), so a bf16 run is checked to start from the
source's fp32 values, not their bf16 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdit import flow
from mmdit.checkpoints import ema_state_dict, zero_state_dict
from mmdit.model import MMDiT, MMDiTConfig
from mmdit.weights import load_weights
from tests.training.conftest import CURVE_SETTINGS, job_args, read_metrics, run_training, succeeded
from training import init_from
from training.export import export

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SOURCE_STEPS = 4


def _args(run_dir: Path, digit_shards, tiny_components, **extra) -> list[str]:
    settings = {**CURVE_SETTINGS, "train.max_steps": SOURCE_STEPS, "train.checkpoint_every": 2}
    return job_args(run_dir, digit_shards, tiny_components, **{**settings, **extra})


def _step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _assert_equal_weights(got: dict, want: dict) -> None:
    want = {k: v for k, v in want.items() if k != "pos_embed"}
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value.float()), name


@pytest.fixture(scope="module")
def source(tmp_path_factory, digit_shards, tiny_components) -> Path:
    run_dir = tmp_path_factory.mktemp("init_source") / "run"
    succeeded(run_training(2, _args(run_dir, digit_shards, tiny_components), timeout=900))
    return run_dir


@pytest.fixture(scope="module")
def from_ema(tmp_path_factory, source, digit_shards, tiny_components) -> tuple[Path, Path]:
    """(run, dumps): one step from `source` (RUN: its newest checkpoint, EMA by default)."""
    base = tmp_path_factory.mktemp("from_ema")
    run_dir, dumps = base / "run", base / "dumps"
    args = _args(
        run_dir,
        digit_shards,
        tiny_components,
        **{"train.max_steps": 1, "train.checkpoint_every": 1, "train.init_from": source},
    )
    succeeded(run_training(2, args, instruments={"MMDIT_TEST_DUMP_DIR": str(dumps)}, timeout=900))
    return run_dir, dumps


def test_a_run_starts_from_the_source_runs_ema_and_records_it(source, from_ema):
    run_dir, dumps = from_ema
    src = ema_state_dict(_step_dir(source, SOURCE_STEPS))
    start = load_file(str(dumps / "weights_0.safetensors"))  # fp32 master weights at step 0
    _assert_equal_weights(start, src)
    # The EMA started from the loaded weights: after one step it is 0.9 source + 0.1 weights.
    after = load_file(str(dumps / "weights_1.safetensors"))
    ema = ema_state_dict(_step_dir(run_dir, 1))
    for name, value in after.items():
        torch.testing.assert_close(ema[name], torch.lerp(src[name], value, 0.1), rtol=0, atol=1e-6)
    assert any(not torch.equal(after[n], src[n]) for n in after)  # it did train

    record = read_metrics(run_dir)[0]
    assert record["init_from"] == str(source)
    assert record["kind"] == "checkpoint" and record["weights"] == "ema"
    assert record["source"] == str(_step_dir(source, SOURCE_STEPS).resolve())
    assert record["source_step"] == SOURCE_STEPS and len(record["hash"]) == 16
    assert record["hash"] == init_from.content_hash({k: v for k, v in src.items()})
    saved = (_step_dir(run_dir, 1) / "config.yaml").read_text()
    assert f"init_from: {source}" in saved
    assert json.loads((_step_dir(run_dir, 1) / "manifest.json").read_text())["step"] == 1


def test_resume_uses_the_runs_own_checkpoint_and_ignores_init_from(
    source, from_ema, digit_shards, tiny_components
):
    run_dir, _ = from_ema
    # A source that no longer exists: only a run that never reads it can succeed.
    args = _args(
        run_dir,
        digit_shards,
        tiny_components,
        **{"train.max_steps": 2, "train.checkpoint_every": 1, "train.init_from": "/gone/run"},
    )
    resumed = succeeded(run_training(2, args, timeout=900))
    assert "train.init_from=/gone/run ignored: the run resumes from its own checkpoint" in (
        resumed.stderr
    )
    assert "step_00000001" in resumed.stderr
    assert sorted(s for s, row in read_metrics(run_dir).items() if "loss" in row) == [1, 2]


def test_raw_weights_of_a_step_into_a_larger_sample_size_rebuild_the_position_table(
    tmp_path, source, digit_shards, tiny_components
):
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    overrides = {
        "train.max_steps": 0,
        "train.init_from": f"{source}:2",
        "train.init_weights": "raw",
        "model.sample_size": 8,
        "data.resolution": 64,
    }
    args = _args(run_dir, digit_shards, tiny_components, **overrides)
    succeeded(run_training(2, args, instruments={"MMDIT_TEST_DUMP_DIR": str(dumps)}, timeout=900))
    src = zero_state_dict(_step_dir(source, 2))
    _assert_equal_weights(load_file(str(dumps / "weights_0.safetensors")), src)
    assert read_metrics(run_dir)[0]["weights"] == "raw"
    saved = zero_state_dict(_step_dir(run_dir, 0))
    config = MMDiTConfig(depth=2, sample_size=8, pos_embed_max_size=8)
    rebuilt = MMDiT(config, initialize=False).pos_embed
    assert torch.equal(saved["pos_embed"], rebuilt)
    assert not torch.equal(src["pos_embed"], rebuilt)  # the source's table was not copied


def test_another_architecture_fails_before_training_with_one_line(
    tmp_path, source, digit_shards, tiny_components
):
    args = _args(
        tmp_path / "run",
        digit_shards,
        tiny_components,
        **{"model.depth": 3, "train.init_from": source},
    )
    failed = run_training(1, args, timeout=900)
    assert failed.returncode == 2
    (line,) = [x for x in failed.stderr.splitlines() if "train.init_from=" in x]
    assert "model.depth=2 (this run 3)" in line and "model.hidden_size=128 (this run 192)" in line
    assert "set those model.* keys to the source's values" in line
    assert "tensors that do not fit" in line and "more)" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_diffusers_folder_gives_the_first_step_loss_of_diffusers_model(
    tmp_path, digit_shards, tiny_components
):
    from diffusers import SD3Transformer2DModel

    from tests.mmdit.tiny_mmdit import randomize

    torch.manual_seed(0)
    theirs = SD3Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=4096,
        caption_projection_dim=128,
        pooled_projection_dim=2048,
        pos_embed_max_size=8,
    )
    randomize(theirs, seed=3)  # no zero-initialised output: the loss depends on every weight
    theirs.save_pretrained(tmp_path / "diffusers")
    theirs.eval()

    run_dir, dumps = tmp_path / "run", tmp_path / "inputs"
    overrides = {
        "train.max_steps": 1,
        "train.precision": "fp32",
        "train.init_from": tmp_path / "diffusers",
    }
    args = _args(run_dir, digit_shards, tiny_components, **overrides)
    dump = {"MMDIT_TEST_DUMP_LOSS_INPUTS": str(dumps)}
    succeeded(run_training(2, args, instruments=dump, timeout=900))
    assert read_metrics(run_dir)[0]["kind"] == "diffusers"

    def diffusers_fn(x, sigma, context, pooled):
        return theirs(
            hidden_states=x,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample

    ranks = [torch.load(dumps / f"loss_inputs_rank_{r}.pt") for r in range(2)]
    for saved in ranks:
        generator = torch.Generator().set_state(saved["generator"])
        with torch.no_grad():
            loss, sigma = flow.training_loss(
                diffusers_fn,
                saved["x0"],
                context=saved["context"],
                pooled=saved["pooled"],
                generator=generator,
            )
        assert torch.equal(sigma, saved["sigma"])
        assert saved["loss"].abs().min() > 1e-3
        torch.testing.assert_close(saved["loss"], loss, rtol=1e-5, atol=1e-6)
    logged = read_metrics(run_dir)[1]["loss"]
    assert logged == pytest.approx(torch.cat([r["loss"] for r in ranks]).double().mean().item())


def test_single_file_and_mmdit_export_sources_read_the_same_weights(tmp_path, source):
    raw = load_weights(_step_dir(source, SOURCE_STEPS))
    run = raw.config
    export(source, "sd3", tmp_path / "sd3.safetensors")
    export(source, "safetensors", tmp_path / "mmdit.safetensors")
    hashes = set()
    for name, kind in (("sd3.safetensors", "sd3"), ("mmdit.safetensors", "mmdit-safetensors")):
        sd, record = init_from._read(str(tmp_path / name), "ema", run)
        assert record["kind"] == kind and record["weights"] == "exported"
        _assert_equal_weights(sd, raw.state_dict)
        hashes.add(record["hash"])
    _, from_run = init_from._read(f"{source}:{SOURCE_STEPS}", "raw", run)
    assert hashes == {from_run["hash"]}


def test_zero_2_starts_from_the_same_weights(tmp_path, source, digit_shards, tiny_components):
    """ZeRO-1/2 replicate the module: rank 0 fills it and deepspeed.initialize broadcasts it;
    each rank's piece of the flat fp32 master weights is then set from the source. Read back
    from the step-0 checkpoint: the master weights (DeepSpeed's shards) and the EMA."""
    run_dir = tmp_path / "run"
    overrides = {"train.max_steps": 0, "train.zero_stage": 2, "train.init_from": source}
    args = _args(run_dir, digit_shards, tiny_components, **overrides)
    succeeded(run_training(2, args, timeout=900))
    src = ema_state_dict(_step_dir(source, SOURCE_STEPS))
    master = zero_state_dict(_step_dir(run_dir, 0))
    _assert_equal_weights({k: v for k, v in master.items() if k != "pos_embed"}, src)
    _assert_equal_weights(ema_state_dict(_step_dir(run_dir, 0)), src)
