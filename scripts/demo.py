"""The main job end to end at toy size, on this machine's CPU (what `make demo` runs).

    .venv/bin/python scripts/demo.py --out runs/demo            # ~10 min on 2 cores
    .venv/bin/python scripts/demo.py --out /tmp/demo --quick    # a few minutes (the CI test)

Every stage is one of the commands a cluster run uses, on the same code path:
 1. a small real image-caption set from images that ship with installed packages
    (mmdit-demo-data), packed into WebDataset shards (mmdit-shards write) and inspected;
 2. tiny SD3 components with a VAE fitted to those images (mmdit-make-tiny-components), and
    precomputed latents and text embeddings (mmdit-precompute);
 3. pretraining under DeepSpeed ZeRO-3 on 2 local ranks (torchrun + mmdit-train), with the
    validation loss of the EMA logged from step 0;
 4. a sample grid (mmdit-sample), the evaluation table (mmdit-eval: validation loss; FID and
    CLIP score when their weights are present), a two-size scaling mini-ladder and its fit
    (mmdit-scaling);
 5. an export to a diffusers folder (mmdit-export) and one image generated from it through
    diffusers.StableDiffusion3Pipeline;
 6. a list of where every artefact is, and the run report (mmdit-report: one HTML page of
    curves, the eval table and the preview grids).
A stage whose outputs exist is skipped (delete OUT to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_cpu.yaml"
LADDER = REPO / "configs" / "scaling" / "ladder_demo.yaml"
BIN = Path(sys.executable).parent


# (command, seconds) in the order they ran: written to demo_summary.json, to see where the
# demo's time goes.
COMMAND_SECONDS: list[tuple[str, float]] = []


def _name(cmd: list[str]) -> str:
    """A short name for a command: the program, with the module or subcommand it runs."""
    program = Path(cmd[0]).name
    if program.startswith("python") and len(cmd) > 2:
        return " ".join([program, *cmd[1:3]]) if cmd[1] == "-m" else f"{program} {cmd[1]}"
    return f"{program} {cmd[1]}" if program == "mmdit-shards" else program


def stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*cmd: str | Path, env: dict | None = None) -> None:
    """Run one command with its own progress output; stop the demo if it fails."""
    cmd = [str(c) for c in cmd]
    print("$ " + " ".join(cmd), flush=True)
    start = time.monotonic()
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, cwd=REPO, env={**full_env, **(env or {})})
    if done.returncode != 0:
        sys.exit(f"demo: this command failed with status {done.returncode}: {' '.join(cmd)}")
    seconds = time.monotonic() - start
    COMMAND_SECONDS.append((_name(cmd), round(seconds, 1)))
    print(f"  ({seconds:.0f} s)", flush=True)


def run_parallel(jobs: list[tuple[list, dict]], logs: Path) -> None:
    """Run commands at once (each logs to LOGS/<n>.log); stop the demo if one fails."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for n, (cmd, extra) in enumerate(jobs):
        cmd = [str(c) for c in cmd]
        log_path = logs / f"job{n}.log"
        print(f"$ {' '.join(cmd)}  > {log_path}", flush=True)
        with open(log_path, "w") as log_file:
            procs.append((cmd, log_path, subprocess.Popen(
                cmd, cwd=REPO, env={**env, **extra}, stdout=log_file, stderr=subprocess.STDOUT
            )))  # fmt: skip
    start = time.monotonic()
    for cmd, log_path, proc in procs:
        if proc.wait() != 0:
            sys.exit(f"demo: failed (see {log_path}): {' '.join(cmd)}")
    seconds = time.monotonic() - start
    COMMAND_SECONDS.append((f"{len(jobs)} x {_name(jobs[0][0])} at once", round(seconds, 1)))
    print(f"  ({seconds:.0f} s)", flush=True)


def tool(name: str) -> Path:
    return BIN / name


def train_overrides(out: Path, quick: bool) -> list[str]:
    overrides = [
        f"train.run_dir={out / 'train'}",
        f"conditioning.components={out / 'components'}",
        f"data.shards={out / 'shards' / 'train'}",
        f"data.cache_shards={out / 'cache' / 'train'}",
        f"eval.val_shards={out / 'cache' / 'val'}",
    ]
    if quick:
        overrides += [
            "train.max_steps=40",
            "train.checkpoint_every=20",
            "eval.val_every=20",
            "train.preview_every=10",
            "train.log_every=5",
            "train.ema_decay=0.9",  # so the EMA moves within 40 steps
        ]
    return overrides


def build_data(out: Path) -> None:
    stage("1/6 data: images from installed packages -> WebDataset shards")
    if not (out / "data" / "summary.json").is_file():
        run(tool("mmdit-demo-data"), "--out", out / "data")
    for split in ("train", "val"):
        if not (out / "shards" / split).is_dir():
            run(tool("mmdit-shards"), "write", "--images-dir", out / "data" / split,
                "--out", out / "shards" / split, "--max-count", "256", "--quiet")  # fmt: skip
    run(tool("mmdit-shards"), "inspect", out / "shards" / "train", "--quiet",
        "--out", out / "shards" / "train_report.json")  # fmt: skip


def build_components(out: Path, quick: bool) -> None:
    stage("2/6 tiny SD3 components (VAE fitted to the images), precomputed latents")
    if not (out / "components" / "model_index.json").is_file():
        steps = ["--vae-steps", "150"] if quick else []
        run(tool("mmdit-make-tiny-components"), "--out", out / "components",
            "--fit-vae", out / "data" / "train", *steps)  # fmt: skip
    for split in ("train", "val"):
        run(tool("mmdit-precompute"), "--config", CONFIG, "--out", out / "cache" / split,
            f"data.shards={out / 'shards' / split}",
            f"conditioning.components={out / 'components'}")  # fmt: skip


def train(out: Path, quick: bool) -> None:
    stage("3/6 pretraining: DeepSpeed ZeRO-3 on 2 local ranks (torchrun)")
    # --standalone: a rendezvous port chosen by the OS (a fixed one collides with tests or a
    # second demo on the machine).
    run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "training.train", "--config", CONFIG,
        *train_overrides(out, quick))  # fmt: skip


def evaluate(out: Path, quick: bool) -> None:
    stage("4/6 samples, evaluation table, scaling mini-ladder")
    from data_pipeline.testing.demo_set import DIGIT_WORDS

    prompts = out / "prompts.txt"
    prompts.write_text("".join(f"a handwritten digit {w}\n" for w in DIGIT_WORDS) * 2)
    run(tool("mmdit-sample"), "--checkpoint", out / "train", "--ema", "--components",
        out / "components", "--prompts", prompts, "--nrow", "10", "--steps", "28",
        "--out", out / "samples.png")  # fmt: skip
    metrics = "val_loss"
    missing = _missing_feature_weights()
    if missing:
        print(f"demo: FID and CLIP score are left out: {missing}", flush=True)
    else:
        metrics += ",fid,clip"
    clip = os.environ.get("MMDIT_CLIP_CHECKPOINT", "")
    extra = ["--clip-checkpoint", clip] if clip else []
    run(tool("mmdit-eval"), "--checkpoints", out / "train", "--metrics", metrics,
        "--components", out / "components", "--out", out / "eval", *extra)  # fmt: skip
    ladder(out, quick)


def _missing_feature_weights() -> str:
    """Why FID / CLIP score cannot run here ("" when both weights files are present): the
    Inception file is looked up as mmdit-eval does, and its error names file, places and URL."""
    from eval.fid import MissingWeightsError, find_inception_weights

    try:
        find_inception_weights()
    except MissingWeightsError as e:
        return str(e)
    if not Path(os.environ.get("MMDIT_CLIP_CHECKPOINT", "-")).is_file():
        return (
            "set MMDIT_CLIP_CHECKPOINT to a local open_clip ViT-L-14 checkpoint file (OpenAI "
            "weights) to add CLIP score, and with it FID"
        )
    return ""


def ladder(out: Path, quick: bool) -> None:
    from mmdit.distributed import free_ports
    from slurm.ladder import expand, load_ladder

    spec = load_ladder(LADDER)
    rungs = expand(spec)
    jobs = []
    # Each single-process rung still opens a process group: distinct ports from the OS.
    for port, rung in zip(free_ports(len(rungs)), rungs, strict=True):
        overrides = [o for o in rung.overrides if not o.startswith("train.run_dir=")]
        if quick:
            overrides = [o for o in overrides if not o.startswith("train.max_steps=")]
            overrides.append(f"train.max_steps={min(rung.steps, 24)}")
        cmd = [
            tool("mmdit-train"), "--config", spec.base, *overrides,
            f"train.run_dir={out / 'ladder' / rung.name}",
            f"conditioning.components={out / 'components'}",
            f"data.shards={out / 'shards' / 'train'}",
            f"data.cache_shards={out / 'cache' / 'train'}",
            f"eval.val_shards={out / 'cache' / 'val'}", "eval.val_every=0",
        ]  # fmt: skip
        jobs.append((cmd, {"MASTER_PORT": str(port)}))
    # One single-threaded process per rung, side by side: the two sizes train at once.
    run_parallel(jobs, logs=out / "ladder_logs")
    runs = sorted(p for p in (out / "ladder").iterdir() if p.is_dir())
    # Raw weights: a rung of ~100 steps is too short for an EMA of decay 0.995 to catch up.
    run(tool("mmdit-eval"), "--checkpoints", *runs, "--metrics", "val_loss", "--weights", "raw",
        "--val-shards", out / "cache" / "val", "--components", out / "components",
        "--out", out / "ladder_eval")  # fmt: skip
    run(tool("mmdit-scaling"), "--table", out / "ladder_eval" / "table.csv",
        "--out", out / "scaling", "--weights", "raw", "--no-irreducible")  # fmt: skip


def export(out: Path) -> None:
    stage("5/6 export to diffusers, one image through StableDiffusion3Pipeline")
    transformer = out / "export" / "transformer"
    run(tool("mmdit-export"), "--checkpoint", out / "train", "--ema", "--format", "diffusers",
        "--out", transformer, "--overwrite")  # fmt: skip
    pipeline = out / "export" / "pipeline"
    if pipeline.exists():
        shutil.rmtree(pipeline)
    shutil.copytree(out / "components", pipeline)
    shutil.copytree(transformer, pipeline / "transformer", dirs_exist_ok=True)
    run(sys.executable, "-c", DIFFUSERS_SNIPPET, pipeline, out / "diffusers_sample.png")


# Runs in its own process: proof that the export loads with diffusers alone.
DIFFUSERS_SNIPPET = """
import sys, torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
image = pipe("a handwritten digit three", num_inference_steps=28, guidance_scale=4.5,
             max_sequence_length=77,
             height=pipe.transformer.config.sample_size * 8,
             width=pipe.transformer.config.sample_size * 8,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(sys.argv[2])
print("diffusers.StableDiffusion3Pipeline wrote", sys.argv[2], image.size)
"""


def report(out: Path) -> dict:
    stage("6/6 artefacts and the run report")
    from eval.report import write_report

    page = write_report([out / "train"], out / "report.html", [out / "eval"])
    metrics = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    artefacts = {
        "data (images + captions)": out / "data",
        "WebDataset shards": out / "shards",
        "tiny components (fitted VAE)": out / "components",
        "precomputed cache": out / "cache",
        "run directory": out / "train",
        "metrics (JSONL)": out / "train" / "metrics.jsonl",
        "TensorBoard logs": out / "train" / "tensorboard",
        "checkpoints": out / "train" / "checkpoints",
        "sample grid": out / "samples.png",
        "evaluation table": out / "eval" / "table.csv",
        "scaling fit and plots": out / "scaling",
        "diffusers export": out / "export" / "transformer",
        "image from StableDiffusion3Pipeline": out / "diffusers_sample.png",
        "run report (mmdit-report)": page,
    }
    for name, path in artefacts.items():
        print(f"  {name:38s} {path}")
    if val:
        print(f"  validation loss (EMA): step {val[0][0]}: {val[0][1]:.4f} -> step "
              f"{val[-1][0]}: {val[-1][1]:.4f}")  # fmt: skip
    print(f"  tensorboard --logdir {out / 'train' / 'tensorboard'}")
    print(f"  run report: open {page}")
    return {"artefacts": {k: str(v) for k, v in artefacts.items()}, "val_loss": val}


def main(argv: list[str] | None = None) -> int:
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="demo",
        description=parts[0],
        epilog="\n\n".join(parts[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--quick", action="store_true", help="reduced step counts (tests)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    build_data(out)
    build_components(out, args.quick)
    train(out, args.quick)
    evaluate(out, args.quick)
    export(out)
    summary = report(out)
    summary["seconds"] = round(time.monotonic() - start)
    summary["command_seconds"] = COMMAND_SECONDS
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo finished in {summary['seconds'] // 60} min {summary['seconds'] % 60} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
