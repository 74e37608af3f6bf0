"""mmdit-submit's rendering and refusals that need no cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm import requeue
from slurm.request import SubmitError, time_to_minutes
from slurm.submit import main
from training import trainer

REPO = Path(__file__).resolve().parents[2]
D24 = str(REPO / "configs" / "d24_512px.yaml")


@pytest.fixture(autouse=True)
def _run_dir_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # emitting creates RUN_DIR/slurm/ for the logs


def _emit(capsys, *flags: str) -> str:
    assert main(["--config", D24, *flags, "--emit-sbatch", "-"]) == 0
    return capsys.readouterr().out


def test_multi_node_sbatch_has_the_request_signal_and_srun_line(capsys):
    script = _emit(
        capsys,
        "--nodes", "4", "--gpus-per-node", "8", "--partition", "h100", "--account", "proj",
        "--qos", "high", "--time", "2-00:00:00", "--constraint", "ib", "--mem", "480G",
        "--cpus-per-task", "12", "--signal-lead", "300", "--max-requeues", "7",
        "train.lr=2e-4", "launch.exclude_bad_nodes=true", "train.run_dir=/runs/d24",
    )  # fmt: skip
    lines = script.splitlines()
    for expected in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --partition=h100",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=ib",
        "#SBATCH --mem=480G",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",  # from the run file's launch section
    ):
        assert expected in lines, expected
    srun = next(line for line in lines if line.startswith("srun "))
    command = lines[lines.index(srun) + 1]
    assert "--kill-on-bad-exit=1" in srun and "%j_%t.err" in srun
    assert "-m training.train --config" in command and D24 in command
    assert "train.lr=2e-4" in command
    requeue_line = next(line for line in lines if "-m slurm.requeue" in line)
    assert "--max-requeues 7 --run-dir /runs/d24 --exclude-bad-nodes" in requeue_line
    assert script.index("#SBATCH --nodes") < script.index("srun ")


def test_cpu_tasks_request_no_gpus(capsys):
    script = _emit(capsys, "--cpu", "--gpus-per-node", "2")
    assert "#SBATCH --ntasks-per-node=2" in script and "--gpus-per-node" not in script


def test_precompute_script_passes_the_output_directory(capsys, tmp_path):
    out = tmp_path / "cache"
    script = _emit(capsys, "--job", "precompute", "--out", str(out), "--nodes", "2")
    assert "-m data_pipeline.precompute --config" in script and f"--out {out}" in script


def test_precompute_without_out_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "--job",
                "precompute",
                "--config",
                D24,
                "--dry-run",
            ]
        )
    assert "--out" in capsys.readouterr().err


def test_missing_config_is_refused_with_its_name(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--config", str(REPO / "configs" / "nope.yaml"), "--dry-run"])
    assert info.value.code == 2 and "nope.yaml" in capsys.readouterr().err


def test_bad_resources_are_refused_before_slurm(capsys):
    assert main(["--config", D24, "--nodes", "0", "--dry-run"]) == 2
    assert "nodes" in capsys.readouterr().err
    assert main(["--config", D24, "--time", "3 days", "--dry-run"]) == 2
    assert "[D-]HH:MM:SS" in capsys.readouterr().err


def test_dry_run_without_slurm_says_where_to_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no sinfo
    assert main(["--config", D24, "--dry-run"]) == 2
    assert "sbatch/sinfo not found" in capsys.readouterr().err


def test_time_parsing():
    assert time_to_minutes("72:00:00") == 72 * 60
    assert time_to_minutes("1-02:03:04") == 26 * 60 + 4  # 4 s round up to a minute
    assert time_to_minutes("90") == 90
    with pytest.raises(ValueError):
        time_to_minutes("1h")
    assert issubclass(SubmitError, ValueError)


def test_requeue_and_trainer_agree_on_the_preempted_status():
    from training import watchdog

    assert requeue.EXIT_PREEMPTED == trainer.EXIT_PREEMPTED
    assert requeue.EXIT_HUNG == watchdog.EXIT_HUNG
    assert requeue.EXIT_STORAGE == trainer.EXIT_STORAGE
    assert requeue.FAULTS_FILE == watchdog.FAULTS_FILE


def test_requeue_after_a_hang_reads_this_jobs_fault_record(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    records = [
        {"job": {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}, "event": "hang"},
        {
            "job": {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"},
            "event": "hang",
            "section": "checkpoint",
            "step": 7,
            "stuck": [{"rank": 3, "host": "gpu-017"}],
        },
        {"job": {"SLURM_JOB_ID": "41"}, "event": "peer_lost"},
        # A failed checkpoint write of this job, recorded after the hang: not the hang.
        {"job": {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"}, "event": "checkpoint_failed"},
    ]
    (tmp_path / "faults.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    record = requeue.last_fault(tmp_path)
    assert record == records[1]  # this run of job 42, not the one before it or another job
    reason = requeue.fault_reason(record)
    assert reason == "training hung in checkpoint at step 7 (rank 3 on gpu-017)"
    assert "no record" in requeue.fault_reason(requeue.last_fault(tmp_path / "elsewhere"))
    # Past the limit the batch script says why and fails the job instead of requeueing.
    args = ["--max-requeues", "2", "--run-dir", str(tmp_path), "--exclude-bad-nodes"]
    assert requeue.main(["--exit-code", "4", *args]) == 1
    err = capsys.readouterr().err
    assert "job 42: training hung in checkpoint at step 7 (rank 3 on gpu-017), but it has " in err
    assert "requeued 2 times (launch.max_requeues=2)" in err
    assert requeue.main(["--exit-code", "137", *args]) == 1
    assert "a rank was killed (srun exit status 137)" in capsys.readouterr().err
    # A storage fault is passed on, not requeued: the same disk would fail the same way.
    assert requeue.main(["--exit-code", "5", *args]) == 5
    assert "a checkpoint could not be written" in capsys.readouterr().err


def test_requeue_limit_stops_with_the_reason(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(RuntimeError, match="requeued 3 times"):
        requeue.requeue_or_stop(3, is_main=True)
    assert requeue.main(["--exit-code", "3", "--max-requeues", "3"]) == 1
    assert requeue.main(["--exit-code", "0", "--max-requeues", "3"]) == 0
    assert requeue.main(["--exit-code", "5", "--max-requeues", "3"]) == 5  # a bug: no requeue
    assert requeue.main(["--exit-code", "1", "--max-requeues", "3"]) == 1


def test_eval_script_runs_mmdit_eval_on_the_run_directory(capsys, tmp_path):
    out = tmp_path / "table"
    script = _emit(capsys, "--job", "eval", "--out", str(out), "--eval-args=--metrics val_loss,fid")
    srun = script[script.index("srun") :]
    assert "-m eval.evaluate" in srun and f"--out {out}" in srun
    assert "--checkpoints" in srun and "--metrics val_loss,fid" in srun
    assert "#SBATCH --requeue" in script


def test_ladder_emits_one_training_job_per_rung(capsys):
    from slurm.ladder import expand, load_ladder

    ladder = str(Path(D24).parent / "scaling" / "ladder_cpu.yaml")
    rungs = expand(load_ladder(ladder))
    assert main(["--ladder", ladder, "--emit-sbatch", "-"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("-m training.train") == len(rungs)
    for rung in rungs:
        assert f"train.run_dir={Path(rung.run_dir).resolve()}" in printed
        assert f"model.depth={rung.depth} train.max_steps={rung.steps}" in printed


def test_a_training_job_that_will_not_fit_is_refused_before_slurm_is_asked(capsys):
    # micro batch 128 without checkpointing at 256 px: ~102 GiB per 80 GiB GPU (mmdit-plan).
    d24_256 = str(REPO / "configs" / "d24_256px.yaml")
    assert main(["--config", d24_256, "--dry-run", "train.micro_batch_size=128"]) == 2
    err = capsys.readouterr().err
    assert "the run will not fit: 10" in err and "GiB per GPU of 80 GiB" in err
    assert "micro batch" in err and "--ignore-memory-plan" in err
    # The same on a 141 GiB H200 passes the memory check and goes on to ask Slurm.
    h200 = ["launch.gpu_memory_gb=141", "train.micro_batch_size=128"]
    main(["--config", d24_256, "--dry-run", *h200])
    assert "will not fit" not in capsys.readouterr().err
    main(["--config", d24_256, "--dry-run", "--ignore-memory-plan", "train.micro_batch_size=128"])
    assert "will not fit" not in capsys.readouterr().err


def test_shipped_cluster_configs_fit_their_gpus():
    from mmdit.typed_config import load
    from training.config import RunConfig
    from training.memory_plan import plan

    for name in ("d24_256px.yaml", "d24_512px.yaml"):
        memory = plan(load(RunConfig, REPO / "configs" / name))
        assert memory.fits, memory.render()
        assert memory.total_bytes < 0.75 * memory.capacity_bytes, name  # headroom left
    from slurm.ladder import expand, load_ladder

    ladder = load_ladder(REPO / "configs" / "scaling" / "ladder_cluster.yaml")
    for rung in expand(ladder):
        memory = plan(load(RunConfig, ladder.base, list(rung.overrides)))
        assert memory.fits, (rung.name, memory.render())
