"""mmdit-export on a real checkpoint: one single-process DeepSpeed ZeRO-3 run (fp32) per module,
then every format exported in-process and checked numerically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmdit import convert
from mmdit.checkpoints import (
    CheckpointError,
    ema_state_dict,
    read_model_config,
    resolve_checkpoint,
    zero_state_dict,
)
from mmdit.model import MMDiT
from mmdit.weights import read_mmdit_safetensors
from tests.mmdit.tiny_mmdit import inputs
from tests.training.conftest import run_training, train_overrides
from training.export import main

ATOL = 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digit_shards, tiny_components) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    overrides = {
        "train.max_steps": 3,
        "train.checkpoint_every": 2,  # checkpoints at steps 2 and 3 (the last)
        "train.precision": "fp32",
        "train.lr": 1e-2,  # move the zero-initialised output layers well away from zero
        "eval.shift": 2.0,  # not the components' scheduler shift (3.0): the export sets it
    }
    args = [
        "--config",
        "configs/debug_cpu.yaml",
        *train_overrides(run, digit_shards, tiny_components, **overrides),
    ]
    result = run_training(1, args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    return run


@pytest.fixture(scope="module")
def step3(run_dir) -> Path:
    return run_dir / "checkpoints" / "step_00000003"


@pytest.fixture(scope="module")
def zero_weights(step3) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(step3), tag="ds"))


def export(*args) -> None:
    assert main([str(a) for a in args]) == 0


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_raw_safetensors_equals_consolidated_zero_weights(run_dir, step3, zero_weights, tmp_path):
    out = tmp_path / "w.safetensors"
    export("--checkpoint", run_dir, "--format", "safetensors", "--out", out)  # run dir: latest
    config, sd = read_mmdit_safetensors(out)
    assert config == read_model_config(step3)
    assert_same_tensors(sd, zero_weights)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["mmdit_step"] == "3" and meta["mmdit_weights"] == "raw"
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary name is gone


def test_diffusers_export_matches_our_model(run_dir, zero_weights, tmp_path, capsys):
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "transformer"
    export("--checkpoint", f"{run_dir}:3", "--format", "diffusers", "--out", out)
    printed = capsys.readouterr().out
    assert str(out) in printed and "diffusion_pytorch_model.safetensors" in printed

    config = read_model_config(run_dir / "checkpoints" / "step_00000003")
    ours = MMDiT(config)
    ours.load_state_dict(zero_weights)
    theirs, info = SD3Transformer2DModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == []
    latents, sigma, ctx, pooled = inputs(config)
    with torch.no_grad():
        a = ours.eval()(latents, sigma, ctx, pooled)
        b = theirs.eval()(
            hidden_states=latents,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample
    assert a.abs().max() > 0.05  # a (near) zero output would prove nothing
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_ema_export_equals_ema_shards(run_dir, step3, zero_weights, tmp_path):
    out = tmp_path / "ema.safetensors"
    export("--checkpoint", step3, "--format", "safetensors", "--ema", "--out", out)
    _, sd = read_mmdit_safetensors(out)
    expected = ema_state_dict(step3)
    assert "pos_embed" not in expected  # the EMA holds parameters only: the export adds it
    assert sorted(sd) == sorted(zero_weights)
    assert_same_tensors({k: sd[k] for k in expected}, expected)
    torch.testing.assert_close(sd["pos_embed"], zero_weights["pos_embed"], atol=1e-6, rtol=0)
    assert any(not torch.equal(sd[k], zero_weights[k]) for k in expected)  # EMA != weights


def test_sd3_single_file_loads_back_through_convert(run_dir, zero_weights, tmp_path):
    out = tmp_path / "sd3.safetensors"
    export("--checkpoint", f"{run_dir}/step_00000003", "--format", "sd3", "--out", out)
    tensors = load_file(str(out))
    assert all(k.startswith(convert.SINGLE_FILE_PREFIX) for k in tensors)
    config = read_model_config(run_dir / "checkpoints" / "step_00000003")
    loaded_cfg, sd = convert.from_sd3_single_file(tensors, sample_size=config.sample_size)
    assert loaded_cfg == config
    assert_same_tensors(sd, zero_weights)


def test_bf16_and_step_forms(run_dir, zero_weights, tmp_path):
    out = tmp_path / "bf16.safetensors"
    export("--checkpoint", f"{run_dir}/2", "--format", "safetensors", "--dtype", "bf16",
           "--out", out)  # fmt: skip
    _, sd = read_mmdit_safetensors(out)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["mmdit_step"] == "2"
    step2 = zero_state_dict(run_dir / "checkpoints" / "step_00000002")
    assert_same_tensors(sd, {k: v.to(torch.bfloat16) for k, v in step2.items()})

    # An existing output is replaced only when asked.
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(run_dir), "--format", "safetensors", "--out", str(out)])
    assert e.value.code == 2
    export("--checkpoint", run_dir, "--format", "safetensors", "--out", out, "--overwrite")
    assert_same_tensors(read_mmdit_safetensors(out)[1], zero_weights)


def test_checkpoint_forms_and_errors(run_dir, step3, tmp_path, capsys):
    # Every form of naming a checkpoint: tests/mmdit/test_checkpoints.py; here, on a real run.
    assert resolve_checkpoint(run_dir) == step3
    assert resolve_checkpoint(f"{run_dir}:2") == run_dir / "checkpoints" / "step_00000002"
    with pytest.raises(CheckpointError, match=r"step 7 .*available steps in .*: 2, 3"):
        resolve_checkpoint(f"{run_dir}:7")

    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", f"{run_dir}/7", "--format", "sd3", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "step_00000007" in err and "available steps" in err and "2, 3" in err

    # A damaged shard is reported, not exported.
    manifest = json.loads((step3 / "manifest.json").read_text())
    ema_name = next(n for n in manifest["files"] if n.startswith("ema_rank_"))
    damaged = tmp_path / "damaged"
    (damaged / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, damaged / "checkpoints" / step3.name)
    (damaged / "checkpoints" / "latest").write_text(step3.name + "\n")
    with open(damaged / "checkpoints" / step3.name / ema_name, "ab") as f:
        f.write(b"x")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(damaged), "--format", "sd3", "--ema", "--out",
              str(tmp_path / "y")])  # fmt: skip
    assert "damaged" in capsys.readouterr().err


def test_pipeline_export_loads_alone_and_samples_as_our_sampler(run_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from eval.loading import conditioning_of
    from mmdit.conditioning import load_text_encoders, load_vae
    from mmdit.sampling import generate, initial_noise
    from mmdit.weights import load_weights

    out = tmp_path / "pipeline"
    export("--checkpoint", run_dir, "--format", "diffusers-pipeline", "--out", out)
    pipe = StableDiffusion3Pipeline.from_pretrained(out)  # nothing else passed
    assert pipe.scheduler.config.shift == 2.0
    card = (out / "README.md").read_text()
    assert "step 3, raw weights" in card and "3 x global batch 2 = 6 samples" in card
    assert "FLOPs" in card
    assert "- loss: " in card and "```yaml" in card and "max_sequence_length=77" in card

    prompt, size, steps, cfg, seed = "a handwritten digit seven", 32, 3, 2.0, 0
    with torch.no_grad():
        theirs = pipe(
            prompt,
            negative_prompt="",
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=size,
            width=size,
            latents=initial_noise(1, 16, size, size, seed),
            max_sequence_length=77,
            output_type="pt",
        ).images
    weights = load_weights(run_dir)
    assert f"{sum(p.numel() for p in weights.model().parameters()):,} parameters" in card
    cond = conditioning_of(weights, None)
    encoders = load_text_encoders(cond, torch.device("cpu"))
    text, negative = encoders.encode([prompt]), encoders.encode([""])
    ours = generate(
        weights.model(),
        load_vae(cond, torch.device("cpu")),
        text.context,
        text.pooled,
        neg_context=negative.context,
        neg_pooled=negative.pooled,
        height=size,
        width=size,
        seed=seed,
        steps=steps,
        cfg_scale=cfg,
        shift=2.0,
    )
    expected = (ours / 2 + 0.5).clamp(0, 1)  # the pipeline's [0, 1] images
    assert expected.std() > 0.01
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=0)


def test_pipeline_export_links_components_and_needs_them(run_dir, tmp_path, capsys):
    out = tmp_path / "linked"
    export(
        "--checkpoint", run_dir, "--format", "diffusers-pipeline", "--link", "symlink", "--out", out
    )
    assert (out / "vae").is_symlink() and (out / "text_encoder_3").is_symlink()
    assert not (out / "transformer").is_symlink()
    with pytest.raises(SystemExit):
        main(
            [
                "--checkpoint",
                str(run_dir),
                "--format",
                "diffusers-pipeline",
                "--components",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "p2"),
            ]
        )
    err = capsys.readouterr().err
    assert "nowhere" in err and "not found" in err
    assert not (tmp_path / "p2").exists()


def test_lora_flags_on_a_full_run_are_refused(run_dir, tmp_path, capsys):
    for fmt in ("diffusers-lora", "diffusers"):
        with pytest.raises(SystemExit):
            main(
                [
                    "--checkpoint",
                    str(run_dir),
                    "--format",
                    fmt,
                    "--merge-lora",
                    "--out",
                    str(tmp_path / "x"),
                ]
            )
        assert "has no LoRA (its lora.rank is 0)" in capsys.readouterr().err
