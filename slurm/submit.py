"""`mmdit-submit`: run mmdit-train (or mmdit-precompute) as a Slurm job through submitit.

    mmdit-submit --config configs/d24_512px.yaml --nodes 8 --gpus-per-node 8 \\
        --partition gpu --account myproj --time 72:00:00
    mmdit-submit --config configs/d24_512px.yaml --dry-run         # check, submit nothing
    mmdit-submit --config configs/d24_512px.yaml --emit-sbatch train.sbatch   # plain sbatch
    mmdit-submit --job precompute --config configs/d24_512px.yaml --out /cache/512 --nodes 4
    mmdit-submit --job eval --config configs/d24_512px.yaml --out runs/d24_512px/eval \\
        --eval-args "--metrics val_loss,fid,clip --weights ema,raw"
    mmdit-submit --ladder configs/scaling/ladder_cluster.yaml --config configs/d24_256px.yaml \\
        --partition gpu --dry-run
    mmdit-submit --config configs/d24_512px.yaml --wait && mmdit-submit --job eval ...

The run file's `launch` section holds the defaults; flags override them. One task per GPU;
ranks, world size and the rendezvous come from Slurm's variables. The job asks for USR2
`launch.signal_lead_s` seconds before its time limit: the trainer checkpoints on all ranks at
the next log step, the job requeues itself (at most `launch.max_requeues` times) and the new
allocation resumes from that checkpoint. Logs and submitit's files go to RUN_DIR/slurm/.

Everything is checked before submission: the config, the partition (`sinfo`), the whole
request (`sbatch --test-only`), that the run directory is not in use by a live job or
holding a run of another model, and that a training job fits in its GPUs' memory (the memory
plan of `mmdit-plan`, for launch.gpu_memory_gb per GPU). `--dry-run` runs the same checks and
prints the request and the memory plan.

`--wait` follows the submitted job to its final state (one line per state change, requeues
included) and sets the exit status: 0 COMPLETED, 1 ended in another state (FAILED, TIMEOUT,
CANCELLED, ...), 2 not submitted, 3 still not final after --wait-timeout (the job goes on).
"""

# One module for one command: its checks (run dir, memory plan), the sbatch rendering and the
# submission all read the same arguments and job; the ladder of runs is slurm/ladder.py.

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path

from mmdit.checkpoints import CONFIG_FILE, LATEST, checkpoints_dir, read_model_config
from mmdit.typed_config import ConfigError, add_config_arguments, config_from_args, to_dict
from slurm.job_state import (
    JobStateTimeout,
    Observation,
    current_state,
    is_final,
    wait_for_final_state,
)
from slurm.request import Request, SubmitError, slurm_available, validate, with_flags
from training.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).with_name("templates")
SUBMISSION = "submission.json"


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="mmdit-submit",
        description=doc[0],
        epilog="\n\n".join(doc[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, required=False)
    parser.add_argument("--job", choices=["train", "precompute", "eval"], default="train")
    parser.add_argument(
        "--out", help="precompute: the cache directory to write; eval: the table directory"
    )
    parser.add_argument(
        "--eval-args",
        default="",
        metavar="'ARGS'",
        help="eval only: mmdit-eval options as one quoted string (default: every checkpoint "
        "of train.run_dir, --metrics val_loss)",
    )
    parser.add_argument(
        "--ladder",
        metavar="FILE",
        help="submit every rung of a scaling ladder (configs/scaling/*.yaml) as a training "
        "job; --config is then the ladder's base run file",
    )
    res = parser.add_argument_group("resources (default: the run file's launch section)")
    res.add_argument("--nodes", type=int)
    res.add_argument("--gpus-per-node", type=int, help="one task (rank) per GPU")
    res.add_argument("--cpu", action="store_true", help="CPU tasks: request no GPUs")
    res.add_argument("--partition")
    res.add_argument("--account")
    res.add_argument("--qos")
    res.add_argument("--time", help="[D-]HH:MM:SS, e.g. 72:00:00")
    res.add_argument("--constraint")
    res.add_argument("--mem", help="per node, e.g. 480G")
    res.add_argument("--cpus-per-task", type=int)
    res.add_argument("--exclusive", action="store_true", default=None)
    res.add_argument("--signal-lead", type=int, dest="signal_lead_s", help="seconds")
    res.add_argument("--max-requeues", type=int)
    res.add_argument(
        "--ignore-memory-plan",
        action="store_true",
        help="submit a training job even when its memory plan (mmdit-plan) says it will not "
        "fit on launch.gpu_memory_gb (the plan is an estimate)",
    )
    follow = parser.add_argument_group("following the job")
    follow.add_argument(
        "--wait",
        action="store_true",
        help="after submitting, follow the job until it ends; exit 0 only if it COMPLETED",
    )
    follow.add_argument(
        "--wait-timeout",
        type=float,
        metavar="SECONDS",
        help="with --wait: stop following after this long, exit 3 (the job goes on). "
        "Default: no limit (queue time and requeues can take days)",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="check and print; submit nothing")
    what.add_argument(
        "--emit-sbatch", metavar="FILE", help="write a plain sbatch script ('-' = stdout)"
    )
    return parser


# -- the run directory -------------------------------------------------------------------------


def job_is_alive(job_id: str) -> bool:
    """Queued, running or requeued (PENDING again): the controller knows the job and it is not
    final. The controller never forgets a live job, whereas sacct can still say RUNNING for a
    job that has ended (its record lags, or the end never reached the database)."""
    obs = current_state(job_id)
    return obs.source == "scontrol" and not is_final(obs.state)


def check_run_dir(run_dir: Path, config: RunConfig) -> None:
    """Refuse a run directory that a live job is using or that holds another model's run."""
    record = run_dir / "slurm" / SUBMISSION
    if record.is_file() and slurm_available():
        previous = json.loads(record.read_text())
        if job_is_alive(str(previous["job_id"])):
            raise SubmitError(
                f"train.run_dir {run_dir} is in use by job {previous['job_id']} (still queued "
                "or running); wait for it, `scancel` it, or choose another train.run_dir"
            )
    latest = checkpoints_dir(run_dir) / LATEST
    if latest.is_file():
        step_dir = checkpoints_dir(run_dir) / latest.read_text().strip()
        if (step_dir / CONFIG_FILE).is_file():
            # The model section only (older run files may not load whole under today's
            # schema), compared on what decides the weights, not how attention is computed.
            theirs = read_model_config(step_dir)
            if not theirs.same_weights_as(config.model):
                mine = asdict(config.model.portable())
                differing = sorted(k for k, v in asdict(theirs).items() if mine[k] != v)
                raise SubmitError(
                    f"train.run_dir {run_dir} holds a run of another model (differs in "
                    f"{', '.join(differing)}); resuming it with this config would not work: "
                    "choose another train.run_dir"
                )


def check_memory(config: RunConfig, args: argparse.Namespace) -> str:
    """The training job's memory plan (training.memory_plan), to print; refuses a job that
    will not fit on its GPUs unless --ignore-memory-plan. CPU tasks have no plan."""
    if not config.launch.gpus:
        return "memory plan: none for CPU tasks (launch.gpus false / --cpu)"
    from training.memory_plan import plan

    memory = plan(config, config_name=args.config)
    if not memory.fits and not args.ignore_memory_plan:
        raise SubmitError(
            f"the run will not fit: {memory.total_bytes / 2**30:.1f} GiB per GPU of "
            f"{memory.capacity_bytes / 2**30:.0f} GiB (launch.gpu_memory_gb); {memory.advice}. "
            f"See mmdit-plan --config {args.config} (or pass --ignore-memory-plan)"
        )
    return memory.render()


# -- rendering ---------------------------------------------------------------------------------


def job_argv(args: argparse.Namespace, config: RunConfig) -> list[str]:
    if args.job == "eval":
        extra = shlex.split(args.eval_args)
        argv = ["--out", str(Path(args.out).resolve())]
        if "--checkpoints" not in extra:
            argv += ["--checkpoints", str(Path(config.train.run_dir).resolve())]
        if "--components" not in extra and config.conditioning.components:
            argv += ["--components", str(Path(config.conditioning.components).resolve())]
        return argv + extra
    argv = ["--config", str(Path(args.config).resolve()), *args.overrides]
    if args.job == "precompute":
        argv[2:2] = ["--out", str(Path(args.out).resolve())]
    elif not Path(config.train.run_dir).is_absolute():
        # The job starts in the repository; the run directory is where it was meant from here.
        argv.append(f"train.run_dir={Path(config.train.run_dir).resolve()}")
    return argv


def render_sbatch(
    args: argparse.Namespace, request: Request, log_dir: Path, argv: list[str]
) -> str:
    template = (TEMPLATES / f"{args.job}.sbatch").read_text()
    values = {
        "SBATCH_LINES": "\n".join(request.sbatch_lines()),
        "LOG_DIR": str(log_dir),
        "REPO": shlex.quote(str(REPO)),
        "PYTHON": shlex.quote(sys.executable),
        "CONFIG": shlex.quote(str(Path(args.config).resolve())),
        "OVERRIDES": " ".join(
            shlex.quote(o) for o in (argv[2:] if args.job == "train" else args.overrides)
        ),
        "MAX_REQUEUES": str(request.launch.max_requeues),
        # For the requeue after a hang: RUN/faults.jsonl names the hosts (log_dir is RUN/slurm).
        "REQUEUE_FLAGS": " ".join(
            ["--run-dir", shlex.quote(str(log_dir.parent))]
            + (["--exclude-bad-nodes"] if request.launch.exclude_bad_nodes else [])
        ),
        "SIGNAL_LEAD": str(request.launch.signal_lead_s),
        "OUT": shlex.quote(str(Path(args.out).resolve())) if args.out else "",
        "ARGV": " ".join(shlex.quote(a) for a in argv),
    }
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", value)
    return template


def describe(request: Request, argv: list[str], job: str) -> str:
    la = request.launch
    lines = [
        f"job:        mmdit-{job} ({request.job_name})",
        f"nodes:      {la.nodes} x {request.tasks_per_node} task(s) = world size "
        f"{request.world_size}",
        f"per task:   {la.cpus_per_task} CPU(s)" + (", 1 GPU" if la.gpus else ", no GPU"),
        f"time:       {la.time} ({request.minutes} min); USR2 {la.signal_lead_s} s before the "
        f"limit; at most {la.max_requeues} requeues",
        "slurm:      " + " ".join(request.sbatch_lines()).replace("#SBATCH ", ""),
        f"each task:  mmdit-{job} " + " ".join(shlex.quote(a) for a in argv),
    ]
    return "\n".join(lines)


# -- submission --------------------------------------------------------------------------------


def submit(args, request: Request, argv: list[str], log_dir: Path):
    import submitit

    from slurm.tasks import ResumableTask, TrainTask

    la = request.launch
    executor = submitit.SlurmExecutor(folder=log_dir / "%j", max_num_timeout=la.max_requeues)
    params = dict(
        job_name=request.job_name,
        nodes=la.nodes,
        ntasks_per_node=request.tasks_per_node,
        cpus_per_task=la.cpus_per_task,
        time=request.minutes,
        signal_delay_s=la.signal_lead_s,
        additional_parameters={"requeue": True},
    )
    if la.gpus:
        params["gpus_per_node"] = la.gpus_per_node
    for name in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(la, name):
            params[name] = getattr(la, name)
    if la.exclusive:
        params["exclusive"] = True
    executor.update_parameters(**params)
    task = (
        TrainTask(tuple(argv), la.max_requeues, la.exclude_bad_nodes)
        if args.job == "train"
        else ResumableTask(args.job, tuple(argv))
    )
    return executor.submit(task)


def follow(job_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> int:
    """--wait: print each state change of the job until it is final; the exit status."""

    def show(obs: Observation, seconds: float) -> None:
        print(f"job {job_id}: {obs.state or 'not known yet'} ({seconds:.0f} s)", flush=True)

    try:
        state = wait_for_final_state(
            job_id, math.inf if timeout_s is None else timeout_s, poll_s, on_change=show
        )
    except JobStateTimeout as e:
        print(f"mmdit-submit: --wait-timeout: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(
            f"\nstopped following job {job_id}; it goes on (`scancel {job_id}` stops it)",
            file=sys.stderr,
        )
        return 130
    if state != "COMPLETED":
        print(f"mmdit-submit: job {job_id} ended {state}, not COMPLETED", file=sys.stderr)
        return 1
    return 0


def _run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The run file's config; for a chain of stages (training.stages), its last stage (the
    largest resolution: the job's memory plan) with the chain's run directory. The job runs
    the whole chain, and its requeued reruns skip the finished stages."""
    from training.stages import chain_config, has_stages

    try:
        if has_stages(args.config):
            return chain_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return config_from_args(RunConfig, args, parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.config:
        parser.error("--config FILE is required (or --ladder FILE)")
    if args.wait and (args.dry_run or args.emit_sbatch):
        parser.error("--wait follows a submitted job; --dry-run and --emit-sbatch submit none")
    config = _run_config(args, parser)
    if args.job in ("precompute", "eval") and not args.out:
        parser.error(f"--job {args.job} needs --out DIR (the cache / table directory)")
    if args.eval_args and args.job != "eval":
        parser.error("--eval-args is for --job eval")
    launch = with_flags(
        config.launch,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpus=False if args.cpu else None,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        constraint=args.constraint,
        mem=args.mem,
        cpus_per_task=args.cpus_per_task,
        exclusive=args.exclusive,
        signal_lead_s=args.signal_lead_s,
        max_requeues=args.max_requeues,
    )
    run_dir = Path(config.train.run_dir if args.job == "train" else args.out).resolve()
    request = Request(launch, job_name=f"mmdit-{args.job}-{run_dir.name}")
    request.minutes  # noqa: B018 (validates launch.time)
    argv = job_argv(args, config)
    log_dir = run_dir / "slurm"
    script = render_sbatch(args, request, log_dir, argv)
    if args.emit_sbatch:
        log_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script
        if args.emit_sbatch == "-":
            sys.stdout.write(script)
        else:
            Path(args.emit_sbatch).write_text(script)
            print(f"wrote {args.emit_sbatch}; submit it with: sbatch {args.emit_sbatch}")
        return 0
    if args.job == "train":
        check_run_dir(run_dir, config)
        memory = check_memory(replace(config, launch=launch), args)
    verdict = validate(request, script)
    print(describe(request, argv, args.job))
    if args.dry_run:
        if args.job == "train":
            print(memory)
        print(f"dry run: nothing submitted. Slurm says: {verdict}")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    job = submit(args, request, argv, log_dir)
    record = {"job_id": job.job_id, "job": args.job, "config": to_dict(config)}
    (log_dir / SUBMISSION).write_text(json.dumps(record, indent=1))
    out = log_dir / job.job_id
    print(f"submitted job {job.job_id}")
    print(f"logs:       {out}/{job.job_id}_<task>_log.out / .err (task 0 = rank 0)")
    print(f"follow:     tail -f {out}/{job.job_id}_0_log.err    squeue -j {job.job_id}")
    if args.job == "train":
        print(f"metrics:    {run_dir}/metrics.jsonl   tensorboard --logdir {run_dir}/tensorboard")
    if args.job == "eval":
        print(f"table:      {run_dir}/table.csv (rows appear as checkpoints finish)")
    return follow(job.job_id, args.wait_timeout) if args.wait else 0


def run_ladder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """One training submission per rung: the ladder's base run file plus the rung's overrides
    (depth, steps, run directory, ...) plus the command line's."""
    from slurm.ladder import expand, load_ladder, table

    if args.job != "train":
        parser.error("--ladder submits training jobs; leave out --job")
    if args.wait:
        parser.error("--wait follows one job; --ladder submits one per rung")
    ladder = load_ladder(args.ladder)
    rungs = expand(ladder)
    print(table(rungs))
    failures = 0
    for rung in rungs:
        print(f"\n== {rung.name}")
        rung_args = argparse.Namespace(**vars(args))
        rung_args.config = str(ladder.base)
        rung_args.overrides = [*rung.overrides, *args.overrides]
        try:
            run(rung_args, parser)
        except SubmitError as e:
            failures += 1
            print(f"mmdit-submit: {rung.name}: error: {e}", file=sys.stderr)
    if failures:
        print(f"{failures} of {len(rungs)} rungs were not submitted", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.wait_timeout is not None and not args.wait:
        parser.error("--wait-timeout is for --wait")
    try:
        return run_ladder(args, parser) if args.ladder else run(args, parser)
    except SubmitError as e:
        print(f"mmdit-submit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
