"""mmdit-submit against the real local Slurm cluster: checks before submission, a 2-task
DeepSpeed job, preemption (USR2 -> checkpoint on all ranks -> requeue -> resume on the
same loss curve) and a hung or killed rank (the watchdog names it -> requeue -> resume)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm.job_state import JobStateTimeout, current_state, is_final, wait_for_final_state
from slurm.submit import main
from tests.training.conftest import read_metrics, train_overrides

# Jobs take ~1 min on 2 idle cores; the bounds (waits of 1200 s, 1800 s a test) are for a
# loaded machine: under a load average of ~19 the 120-step reference job outlived a 400 s wait.
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]

STEPS = 120


def _submit_args(run_dir: Path, shards, components, **extra) -> list[str]:
    settings = {
        "train.max_steps": STEPS,
        "train.checkpoint_every": 60,
        "train.precision": "fp32",
        "train.global_batch_size": 4,
        **extra,
    }
    return [
        "--config",
        "configs/debug_cpu.yaml",
        "--cpu",
        "--gpus-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "00:15:00",
        *train_overrides(run_dir, shards, components, **settings),
    ]


def _job_id(out: str) -> str:
    line = next(x for x in out.splitlines() if x.startswith("submitted job "))
    return line.split()[-1]


def _wait_done(job_id: str, timeout: float = 1200) -> str:
    try:
        return wait_for_final_state(job_id, timeout, poll_s=1)
    except JobStateTimeout:
        subprocess.run(["scancel", job_id])
        raise


def _losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in read_metrics(run_dir).items()}


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm").rglob("*.err")))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory, digit_shards, tiny_components):
    run_dir = tmp_path_factory.mktemp("slurm_reference") / "run"
    args = _submit_args(run_dir, digit_shards, tiny_components)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    job = _job_id(out.getvalue())
    state = _wait_done(job)
    assert state == "COMPLETED", (state, _logs(run_dir)[-3000:])
    return run_dir, out.getvalue()


def test_two_task_job_trains_with_deepspeed_across_both_tasks(uninterrupted):
    run_dir, printed = uninterrupted
    assert "logs:" in printed and "follow:" in printed
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    manifest = json.loads(
        (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text()
    )
    assert manifest["world_size"] == 2  # both Slurm tasks were ranks of one DeepSpeed job
    record = json.loads((run_dir / "slurm" / "submission.json").read_text())
    assert record["config"]["train"]["max_steps"] == STEPS


def test_usr2_checkpoints_requeues_and_resumes_on_the_same_curve(
    uninterrupted, tmp_path, digit_shards, tiny_components, capsys
):
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    assert main(_submit_args(run_dir, digit_shards, tiny_components)) == 0
    job = _job_id(capsys.readouterr().out)
    deadline = time.monotonic() + 900
    while not (run_dir / "metrics.jsonl").exists() or max(read_metrics(run_dir), default=0) < 10:
        assert time.monotonic() < deadline, _logs(run_dir)[-3000:]
        state = current_state(job)
        assert not is_final(state.state), (
            f"job {job} ended {state} before step 10",
            _logs(run_dir)[-3000:],
        )
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = _wait_done(job)
    logs = _logs(run_dir)
    assert state == "COMPLETED", (state, logs[-3000:])
    assert "requeueing (requeue 1 of at most 20)" in logs
    assert "stopping at step" in logs
    stopped = int(logs.split("stopping at step ")[1].split()[0])
    assert 10 <= stopped < STEPS  # the signal's checkpoint, not a periodic one
    assert _losses(run_dir) == _losses(reference)


def test_dry_run_checks_the_request_with_slurm(slurm_cluster, tmp_path, capsys):
    base = ["--config", "configs/debug_cpu.yaml", f"train.run_dir={tmp_path / 'run'}"]
    assert main([*base, "--dry-run", "--cpu", "--cpus-per-task", "1"]) == 0
    assert "dry run: nothing submitted" in capsys.readouterr().out
    assert main([*base, "--dry-run", "--partition", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown partition 'nope'" in err and slurm_cluster.partition in err
    assert main([*base, "--dry-run", "--cpu", "--nodes", "3"]) == 2
    assert "Slurm refuses this request" in capsys.readouterr().err
    assert main([*base, "--dry-run", "--cpu", "--cpus-per-task", "8"]) == 2
    assert "Slurm refuses this request" in capsys.readouterr().err


def test_a_run_directory_in_use_or_of_another_model_is_refused(slurm_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["--config", "configs/debug_cpu.yaml", f"train.run_dir={run_dir}", "--cpu"]
    sleeper = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-n",
            "1",
            "-o",
            str(tmp_path / "sleep.out"),
            "--wrap",
            "sleep 120",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        (run_dir / "slurm").mkdir(parents=True)
        (run_dir / "slurm" / "submission.json").write_text(json.dumps({"job_id": sleeper}))
        assert main([*base, "--dry-run"]) == 2
        assert f"in use by job {sleeper}" in capsys.readouterr().err
    finally:
        subprocess.run(["scancel", sleeper])
    (run_dir / "slurm" / "submission.json").unlink()
    step = run_dir / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000010\n")
    (step / "config.yaml").write_text("model:\n  depth: 4\n")
    assert main([*base, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another model" in err and "depth" in err
    assert "choose another train.run_dir" in err


def test_emitted_sbatch_script_trains_on_the_cluster(
    slurm_cluster, tmp_path, digit_shards, tiny_components, capsys
):
    run_dir, script = tmp_path / "run", tmp_path / "train.sbatch"
    args = _submit_args(run_dir, digit_shards, tiny_components, **{"train.max_steps": 6})
    assert main([*args, "--emit-sbatch", str(script)]) == 0
    job = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True
    ).stdout.strip()
    state = _wait_done(job)
    logs = "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*")))
    assert state == "COMPLETED", (state, logs[-3000:])
    assert sorted(_losses(run_dir)) == list(range(1, 7))
    assert "training finished" in logs


def test_precompute_job_writes_the_cache_with_two_tasks(
    slurm_cluster, tmp_path, digit_shards, tiny_components, capsys
):
    out = tmp_path / "cache"
    args = [
        "--job", "precompute", "--config", "configs/debug_cpu.yaml", "--out", str(out),
        "--cpu", "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "00:10:00",
        f"data.shards={digit_shards}/{{000000..000007}}.tar",
        f"conditioning.components={tiny_components}", "data.resolution=32",
    ]  # fmt: skip
    # --wait: mmdit-submit itself follows the job and succeeds only if it COMPLETED.
    assert main([*args, "--wait", "--wait-timeout", "1200"]) == 0, _logs(out)[-3000:]
    printed = capsys.readouterr().out
    job = _job_id(printed)
    assert printed.rstrip().splitlines()[-1].startswith(f"job {job}: COMPLETED (")
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:06d}.tar" for i in range(8)]
    assert (out / "_cache_info.json").is_file()


def test_eval_job_splits_the_val_loss_over_two_tasks_and_matches_one_process(
    uninterrupted, digit_shards, tiny_components, tmp_path, capsys
):
    from eval.evaluate import main as eval_main

    run_dir, _ = uninterrupted
    out = tmp_path / "eval"
    val = f"--metrics val_loss --val-shards {digit_shards}/{{000006..000007}}.tar --val-samples 16"
    args = [
        "--job", "eval", "--config", "configs/debug_cpu.yaml", "--out", str(out), "--cpu",
        "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "00:10:00",
        f"--eval-args={val} --sigma-bins 2 --weights ema,raw",
        *train_overrides(run_dir, digit_shards, tiny_components),
    ]  # fmt: skip
    assert main(args) == 0
    job = _job_id(capsys.readouterr().out)
    assert _wait_done(job) == "COMPLETED", _logs(out)[-3000:]
    rows = json.loads((out / "table.json").read_text())
    assert [(r["step"], r["weights"]) for r in rows] == [
        (60, "ema"), (60, "raw"), (STEPS, "ema"), (STEPS, "raw"),
    ]  # fmt: skip
    local = tmp_path / "local"
    assert eval_main([
        "--checkpoints", f"{run_dir}:{STEPS}", "--components", str(tiny_components),
        "--out", str(local), *val.split(), "--sigma-bins", "2",
    ]) == 0  # fmt: skip
    one = json.loads((local / "table.json").read_text())[0]
    assert one["val_loss"] == pytest.approx(rows[2]["val_loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("fault", "event", "named"),
    [
        (signal.SIGSTOP, "training hung in step at step", "Stuck: rank 1 on"),
        (signal.SIGKILL, "training lost a peer in step at step", "Silent: rank 1 on"),
    ],
    ids=["stopped", "killed"],
)
def test_a_stopped_or_killed_rank_requeues_the_job_which_resumes_on_the_same_curve(
    uninterrupted, tmp_path, digit_shards, tiny_components, capsys, fault, event, named
):
    """SIGSTOP (what a wedged GPU looks like) or SIGKILL one task of a running job: the other
    rank's watchdog names it, the job requeues itself, and the next run resumes from the
    step-60 checkpoint and finishes on the reference curve."""
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    faults = {"faults.step_timeout_s": 20, "faults.heartbeat_s": 1}
    assert main(_submit_args(run_dir, digit_shards, tiny_components, **faults)) == 0
    job = _job_id(capsys.readouterr().out)
    beat_file = run_dir / "heartbeats" / "rank_00001.json"
    deadline = time.monotonic() + 900
    while True:  # past the step-60 checkpoint
        beat = json.loads(beat_file.read_text()) if beat_file.exists() else {"step": 0}
        if beat["step"] > 62:
            break
        assert time.monotonic() < deadline, _logs(run_dir)[-3000:]
        assert not is_final(current_state(job).state), _logs(run_dir)[-3000:]
        time.sleep(0.2)
    os.kill(beat["pid"], fault)
    state = _wait_done(job)
    logs = _logs(run_dir)
    assert state == "COMPLETED", (state, logs[-3000:])
    assert f"{named} {beat['host']} (pid {beat['pid']})" in logs
    assert event in logs
    assert "requeueing (requeue 1 of at most 20)" in logs
    assert "checkpoints/step_00000060" in logs.split("requeueing")[1]  # resumed there
    (record,) = [json.loads(x) for x in (run_dir / "faults.jsonl").read_text().splitlines()]
    assert record["job"]["SLURM_JOB_ID"] == job and record["stuck"][0]["rank"] == 1
    assert _losses(run_dir) == _losses(reference)


def test_bad_nodes_are_added_to_a_pending_jobs_excluded_nodes(slurm_cluster, tmp_path):
    from slurm.requeue import exclude

    job = subprocess.run(
        ["sbatch", "--parsable", "--hold", "-o", str(tmp_path / "out"), "--wrap", "true"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:

        def excluded() -> str:
            shown = subprocess.run(
                ["scontrol", "show", "job", "-o", job], capture_output=True, text=True
            ).stdout
            return next(f for f in shown.split() if f.startswith("ExcNodeList="))

        assert excluded() == "ExcNodeList=(null)"
        exclude(job, ["localhost"])
        assert excluded() == "ExcNodeList=localhost"
        exclude(job, ["localhost"])  # merged with what is there, not repeated
        assert excluded() == "ExcNodeList=localhost"
    finally:
        subprocess.run(["scancel", job])


def test_a_2_node_job_trains_and_resumes_on_one_node_on_the_same_curve(
    two_node_cluster, uninterrupted, tmp_path, digit_shards, tiny_components, monkeypatch, capsys
):
    """Two slurmd, one task on each: MASTER_ADDR comes from the job's node list and each task
    is local rank 0 of its node; the run then resumes on one node with two tasks."""
    reference, _ = uninterrupted
    monkeypatch.setenv("SLURM_CONF", str(two_node_cluster.slurm_conf))
    run_dir = tmp_path / "run"
    half = {"train.max_steps": STEPS // 2}
    # The layout flags given after _submit_args' own ones win (argparse keeps the last).
    layout = ["--nodes", "2", "--gpus-per-node", "1"]
    assert main([*_submit_args(run_dir, digit_shards, tiny_components, **half), *layout]) == 0
    job = _job_id(capsys.readouterr().out)
    state = _wait_done(job)
    assert state == "COMPLETED", (state, _logs(run_dir)[-3000:])
    nodes = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job, "-o", "NNodes,NodeList"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert nodes == ["2|127.0.0.[1-2]"], nodes
    assert max(read_metrics(run_dir)) == STEPS // 2

    one_node = ["--nodes", "1", "--gpus-per-node", "2"]
    assert main([*_submit_args(run_dir, digit_shards, tiny_components), *one_node]) == 0
    job = _job_id(capsys.readouterr().out)
    state = _wait_done(job)
    logs = _logs(run_dir)
    assert state == "COMPLETED", (state, logs[-3000:])
    assert f"checkpoints/step_{STEPS // 2:08d}" in logs  # resumed from the 2-node checkpoint
    assert _losses(run_dir) == _losses(reference)
