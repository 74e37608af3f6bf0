"""bench/gpu.py: its tiny run on the CPU (the same code path a GPU run takes) writes every
section with numbers that agree with their own FLOP counts; the budget, failure recording and
summary logic on their own."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.buckets import make_buckets
from mmdit import flops
from mmdit.attention import BACKENDS
from mmdit.model import MMDiTConfig

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "attention", "gemm", "model", "trainer", "summary")
# Backends the CPU can run; the others must say why not (CUDA only, or a missing package).
CPU_BACKENDS = {"sdpa", "sdpa_flash", "sdpa_math"}


def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


gpu = _load_gpu_bench()


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu_tiny.json"
    cmd = [sys.executable, "bench/gpu.py", "--tiny", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_run_has_every_section_without_skips_or_errors(tiny_report):
    for name in SECTIONS:
        section = tiny_report[name]
        assert not section.get("skipped"), (name, section.get("skipped"))
        assert not section.get("errors"), (name, section.get("errors"))
    assert tiny_report["summary"]["skipped"] == []
    env = tiny_report["environment"]
    assert env["torch"] == torch.__version__
    assert env["device"] == "cpu" and env["device_slug"] == "cpu"
    assert env["peak_bf16_flops"] is None


@pytest.mark.slow
def test_tiny_attention_every_backend_timed_or_explained(tiny_report):
    section = tiny_report["attention"]
    b, h, dh = section["batch"], section["heads"], section["head_dim"]
    results = section["results"]
    assert sorted({r["backend"] for r in results}) == sorted(BACKENDS)
    assert {r["text_tokens"] for r in results} == {154, 333}
    for r in results:
        if r["backend"] in CPU_BACKENDS:
            assert r["status"] == "ok", r
            fwd = 4 * b * h * r["tokens"] ** 2 * dh
            assert r["fwd_flop"] == fwd and r["fwd_bwd_flop"] == 3.5 * fwd
            assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0
            assert _close(r["fwd_tflops"], fwd / r["fwd_s"] / 1e12)
            assert _close(r["fwd_bwd_tflops"], 3.5 * fwd / r["fwd_bwd_s"] / 1e12)
        else:
            assert "only runs on CUDA" in r["status"] or "needs the" in r["status"], r
    # The kernel the default backend ran is named, and is one that ran on its own too.
    used = tiny_report["environment"]["sdpa_default"]
    assert used["status"] == "ok" and used["equivalent_backend"] in CPU_BACKENDS, used
    assert any(op.startswith("aten::_scaled_dot_product") for op in used["aten_ops"])


@pytest.mark.slow
def test_tiny_gemms_match_their_shapes(tiny_report):
    section = tiny_report["gemm"]
    d, per_sample = section["hidden"], section["tokens_per_sample"]
    results = section["results"]
    assert len(results) == 15  # 5 linears x 3 layouts at the one tiny batch
    for r in results:
        assert r["status"] == "ok", r
        assert r["flop"] == 2 * r["M"] * r["N"] * r["K"]
        assert r["seconds"] > 0 and _close(r["tflops"], r["flop"] / r["seconds"] / 1e12)
    qkv = next(r for r in results if r["name"] == "qkv" and r["layout"] == "forward")
    assert (qkv["M"], qkv["K"], qkv["N"]) == (qkv["batch"] * per_sample, d, 3 * d)
    mod = next(r for r in results if r["name"] == "modulation" and r["layout"] == "forward")
    assert (mod["M"], mod["N"]) == (mod["batch"], 6 * d)


@pytest.mark.slow
def test_tiny_model_sweep_numbers_follow_the_flop_count(tiny_report):
    section = tiny_report["model"]
    cfg = MMDiTConfig(**{**section["config"], "dual_attention_layers": ()})
    h, w = section["latent"]
    per_sample = flops.matmul_flops_per_sample(cfg, h, w, section["text_tokens"], training=True)
    assert section["train_matmul_flops_per_sample"] == per_sample
    first, rest = gpu.sweep_plan(gpu.TINY)
    entries = section["entries"]
    assert [(e["compiled"], e["checkpointing"], e["batch"]) for e in entries] == first + rest
    for e in entries:
        assert e["status"] == "ok", e
        assert e["flop_per_step"] == e["batch"] * per_sample
        assert 0 < e["min_s"] <= e["median_s"] and e["first_call_s"] > 0
        assert _close(e["tflops"], e["flop_per_step"] / e["median_s"] / 1e12)
        assert e["mfu"] is None  # no bf16 peak for a CPU
        if e["compiled"]:
            assert e["graphs_added"] >= 1 and e["compile_s"] > 0
        else:
            assert e["graphs_added"] == 0
    buckets = section["buckets"]
    assert buckets["status"] == "ok"
    assert buckets["buckets"] == len(make_buckets(buckets["resolution"])) == 5
    assert [tuple(b["bucket"]) for b in buckets["per_bucket"]] == make_buckets(128)
    assert all(b["seconds"] > 0 for b in buckets["per_bucket"])
    assert 1 <= buckets["graphs_built"] <= 4


@pytest.mark.slow
def test_tiny_trainer_step_reports_what_the_trainer_logged(tiny_report):
    section = tiny_report["trainer"]
    assert section["status"] == "ok", section.get("log_tail")
    sizes = gpu.TINY
    rows = section["rows"]
    assert [r["step"] for r in rows] == list(range(1, sizes.trainer_steps + 1))
    cfg = MMDiTConfig(**{**tiny_report["model"]["config"], "dual_attention_layers": ()})
    per_sample = flops.approx_train_flops_per_sample(cfg, section["image_tokens"], 154)
    for r in rows:
        assert r["samples_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
        # The trainer's TFLOP/s is its closed-form FLOPs per sample x samples/s.
        assert _close(r["tflops_per_s"], r["samples_per_s"] * per_sample / 1e12, 1e-6)
        assert "mfu" not in r
    median = section["median"]
    assert median["steps_in_median"] == list(range(sizes.trainer_skip + 1, sizes.trainer_steps + 1))
    assert _close(median["step_s"], section["micro_batch"] / median["samples_per_s"])
    assert section["micro_batch"] == sizes.trainer_micro_batch
    # DeepSpeed's CPU allreduce buffer (69 MB of /dev/shm) does not outlive the run.
    port = section["rendezvous_port"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


@pytest.mark.slow
def test_tiny_summary_states_the_targets(tiny_report):
    summary = tiny_report["summary"]
    targets = {t["target"]: t for t in summary["targets"]}
    assert set(targets) >= {0.45, 5.0, 4}
    graphs = next(t for t in summary["targets"] if "graphs" in t["what"])
    assert graphs["value"] == tiny_report["model"]["buckets"]["graphs_built"]
    assert graphs["met"] is True
    mfu = [t for t in summary["targets"] if "MFU" in t["what"]]
    assert mfu and all(t["value"] is None and t["met"] is None for t in mfu)  # a CPU has no MFU
    assert (
        summary["trainer_step"]["samples_per_s"]
        == tiny_report["trainer"]["median"]["samples_per_s"]
    )


def test_zero_budget_skips_every_section_with_a_note_and_still_writes(tmp_path):
    out = tmp_path / "gpu.json"
    report = gpu.main(["--tiny", "--device", "cpu", "--out", str(out), "--budget-s", "0"])
    on_disk = json.loads(out.read_text())
    assert on_disk["summary"] == report["summary"]
    for name in ("environment", "attention", "gemm", "model", "trainer"):
        notes = on_disk[name]["skipped"]
        assert notes and all("--budget-s 0" in n for n in notes), (name, notes)
    assert len(on_disk["summary"]["skipped"]) == 6  # model has two parts
    assert all(t["met"] is None for t in on_disk["summary"]["targets"])


def test_failures_are_recorded_as_oom_or_error_and_memory_released():
    cleaned = []

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken():
        raise ValueError("no such kernel\nsecond line")

    assert gpu.guarded(oom, lambda: cleaned.append(1)) == {"status": "oom"}
    assert gpu.guarded(broken) == {"status": "ValueError: no such kernel"}
    assert gpu.guarded(lambda: {"x": 1}) == {"status": "ok", "x": 1}
    assert cleaned == [1]


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx_6000_ada_generation"),
    ],
)
def test_device_slug(name, slug):
    assert gpu.device_slug(name) == slug


def test_sweep_covers_the_grid_once_with_the_headline_numbers_first():
    first, rest = gpu.sweep_plan(gpu.FULL)
    grid = {(c, m, b) for c in (False, True) for m in gpu.FULL.compiled_modes for b in (8, 16, 32)}
    assert len(first + rest) == len(grid) == 24 and set(first + rest) == grid
    assert first == [
        (False, "none", 8),
        (False, "block", 8),
        (False, "none", 16),
        (False, "block", 16),
        (True, "block", 16),
    ]
    assert rest.index((False, "mlp", 32)) < rest.index((True, "mlp", 16))  # eager, then compiled


def _entry(compiled, mode, batch, mfu):
    return {"status": "ok", "compiled": compiled, "checkpointing": mode, "batch": batch,
            "median_s": 1.0, "tflops": 989 * mfu, "mfu": mfu}  # fmt: skip


def test_summary_compares_best_and_default_settings_with_the_targets():
    report = {
        "model": {
            "entries": [
                _entry(False, "mlp", 16, 0.38),
                _entry(False, "mlp", 32, 0.41),  # configs/d24_512px.yaml: eager, mlp, 32
                _entry(True, "none", 16, 0.47),  # the best
                {"status": "oom", "compiled": False, "checkpointing": "none", "batch": 32},
            ],
            "buckets": {"resolution": 512, "graphs_built": 6},
        },
        "trainer": {"median": {"mfu": 0.36, "samples_per_s": 10.0}, "micro_batch": 20},
    }
    summary = gpu.summarize(report)
    assert summary["model_best"]["mfu"] == 0.47 and summary["model_best"]["compiled"]
    assert summary["model_default_config"]["batch"] == 32
    best, gap, graphs, trainer = summary["targets"]
    assert "best" in best["what"] and best["value"] == 0.47 and best["met"] is True
    assert "default" in gap["what"] and math.isclose(gap["value"], 6.0) and gap["met"] is False
    assert "bucket" in graphs["what"] and graphs["value"] == 6 and graphs["met"] is False
    assert "trainer" in trainer["what"] and trainer["value"] == 0.36 and trainer["met"] is False


def test_trainer_medians_leave_out_the_first_steps():
    rows = [
        {
            "step": s,
            "samples_per_s": v,
            "tflops_per_s": v,
            "data_wait_frac": 0.5 if s == 1 else 0.01,
        }
        for s, v in [(1, 1.0), (2, 8.0), (3, 10.0), (4, 12.0)]
    ]
    m = gpu.summarize_trainer(rows, skip=1, micro=4, flop_per_sample=1e12)
    assert m["steps_in_median"] == [2, 3, 4]
    assert m["samples_per_s"] == 10.0 and m["step_s"] == 0.4 and m["data_wait_frac"] == 0.01
    assert m["matmul_tflops_per_s"] == 10.0 and m["mfu"] is None
