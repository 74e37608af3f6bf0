"""Training metrics: JSONL (always), TensorBoard (always), W&B (when a project is set).

Every rank constructs a `MetricsLogger`; only the writer rank (global rank 0) touches the
disk, prints, or talks to W&B, so the trainer can call it unconditionally. The trainer reduces
its device tensors to python numbers on log steps only, so nothing here ever syncs the host
with the device.

Resume: a run killed after its last checkpoint has already logged steps that the resumed run
will redo. On open, `metrics.jsonl` keeps only the lines with step <= resume_step (and drops a
line torn by a crash mid-write), and TensorBoard purges events after resume_step, so every
step appears once and the loss curve continues where the checkpoint left it.

W&B on resume (and on a Slurm requeue): the run id lives in RUN/wandb_id.txt and the run is
reopened with resume="allow", so every incarnation appends to one W&B run. W&B may hold fewer
steps than metrics.jsonl (a kill -9 loses the rows it had not written) or more than the
checkpoint (steps the resumed run redoes): steps it lacks up to resume_step are replayed from
metrics.jsonl, and steps it already has are not sent again, so each step is in it once. What
W&B holds is read from its offline files (training.wandb_offline) in offline mode and from the
resumed run's starting step online.

Beyond scalars: `image` (preview grids) and `histogram` (the sigmas the sampler drew) go to
TensorBoard and W&B; the per-sigma-bin losses get one TensorBoard chart per family (custom
scalars) and the validation loss per bin a W&B bar chart. The resolved run file is written to
RUN/run_config.yaml, shown in TensorBoard's text tab and attached to the W&B run (its config
is the run file as a mapping).

Metric names the console line understands (all optional): ``loss``, ``lr``,
``samples_per_s``, ``tflops_per_s`` (TFLOP/s per device), ``mfu`` and ``data_wait_frac``
(fractions in [0, 1]). Nested mappings (e.g. loss per sigma bin) are kept nested in JSONL
and flattened to "a/b" names for TensorBoard and W&B.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import numbers
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmdit.atomic_file import write_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_DIR = "wandb"  # wandb.init(dir=RUN) puts its files in RUN/wandb
RUN_CONFIG_FILE = "run_config.yaml"
PREVIEW_TAG = "preview"
PREVIEW_FILE = "previews/step_{step:08d}.png"  # where training.preview writes its grids
# One TensorBoard chart per family of per-sigma-bin curves (each bin a line).
SIGMA_BIN_LAYOUT = {
    "sigma bins": {
        "training loss per sigma bin": ["Multiline", [r"loss_by_sigma/.*"]],
        "validation loss per sigma bin": ["Multiline", [r"val_loss_by_sigma/.*"]],
    }
}
RESERVED_KEYS = ("step", "time")

# Weight of the newest interval in the smoothed step rate: responsive enough to follow a real
# slowdown, smooth enough that one slow log interval (a checkpoint save) does not swing the ETA.
RATE_SMOOTHING = 0.3


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"bin0": 1.0}} -> {"loss/bin0": 1.0}."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def _plain(name: str, value: Any) -> Any:
    """A JSON-ready python value, or a TypeError that says how to fix the caller."""
    if isinstance(value, Mapping):
        return {str(k): _plain(f"{name}/{k}", v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # python and numpy floats
        return float(value)
    raise TypeError(
        f"metric {name!r} is a {type(value).__module__}.{type(value).__qualname__}; "
        "MetricsLogger.log takes python numbers only: reduce device tensors with .item() "
        "on log steps (never every step, which would sync the host with the device)"
    )


def _numeric(flat: Mapping[str, Any]) -> dict[str, float | int]:
    return {
        k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _read_kept_lines(path: Path, resume_step: int) -> tuple[list[str], bool]:
    """The lines of `path` to keep and whether any were dropped.

    Kept: complete lines holding a JSON object with an integer step <= resume_step. A torn
    last line (no newline, or not valid JSON) is dropped, as are steps the resumed run redoes.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    kept = []
    for line in lines:
        if not line.endswith("\n"):
            continue  # torn by a crash mid-write
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if record["step"] <= resume_step:
            kept.append(line)
    return kept, len(kept) != len(lines)


def append_whole_line(f, line: str) -> None:
    """Append `line` to `f` (a file opened "ab" without buffering): all of it or, when a write
    fails (a full disk), none of it: a torn line would glue itself to the next one."""
    start = os.fstat(f.fileno()).st_size
    view = memoryview(line.encode())
    try:
        while view:  # a full disk first writes part, then raises
            view = view[f.write(view) :]
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(f.fileno(), start)
        raise


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class MetricsLogger:
    """Writes metrics on the writer rank; a no-op on every other rank."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        is_writer: bool,
        max_steps: int,
        resume_step: int = 0,
        wandb_project: str = "",
        wandb_entity: str = "",
        wandb_mode: str = "online",
        run_name: str = "",
        config: dict | None = None,
        config_yaml: str = "",
        clock: Callable[[], float] = time.monotonic,
    ):
        """`config`: the run file as a mapping (W&B's config); `config_yaml`: the resolved run
        file's text (RUN/run_config.yaml). `clock` measures the step rate for the ETA (wall
        clock; injectable for tests)."""
        if resume_step < 0:
            raise ValueError(f"resume_step={resume_step} must be >= 0")
        if wandb_project and importlib.util.find_spec("wandb") is None:
            # Checked on every rank, so a misconfigured run fails everywhere at once instead of
            # rank 0 dying while the others wait in a collective.
            raise RuntimeError(
                f"train.wandb_project={wandb_project!r} but wandb is not installed: "
                "`pip install wandb`, or unset train.wandb_project (JSONL and TensorBoard "
                "metrics are written either way)"
            )
        self.run_dir = Path(run_dir)
        self.is_writer = is_writer
        self.max_steps = max_steps
        self.resume_step = resume_step
        self._clock = clock
        self._last_log: tuple[int, float] = (resume_step, clock())
        self._steps_per_s: float | None = None
        self._jsonl = None
        self._tb = None
        self._wandb_run = None
        self._wandb_has = -1  # the highest step the W&B run already holds (-1: none)
        self._warned = False  # a write failed (warned once; metrics are not worth a crash)
        if not is_writer:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        kept: list[str] = []
        if self.metrics_path.exists():
            kept, dropped = _read_kept_lines(self.metrics_path, resume_step)
            if dropped:
                write_atomic(self.metrics_path, "".join(kept))
        if config_yaml:
            write_atomic(self.run_dir / RUN_CONFIG_FILE, config_yaml)
        self._jsonl = open(self.metrics_path, "ab", buffering=0)  # noqa: SIM115

        # Imported here: tensorboard is only needed where something is written.
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(
            str(self.run_dir / TENSORBOARD_DIR),
            purge_step=resume_step + 1 if resume_step else None,
        )
        # Step-0 events go in the first run's file only: in a resumed run's file, an event
        # older than the newest step makes TensorBoard drop the steps after it.
        if not resume_step:
            self._tb.add_custom_scalars(SIGMA_BIN_LAYOUT)
        if config_yaml and not resume_step:
            # Markdown: indented four spaces, the YAML shows as a code block.
            text = "".join(f"    {line}\n" for line in config_yaml.splitlines())
            self._tb.add_text(RUN_CONFIG_FILE, text, global_step=0)
        if wandb_project:
            self._wandb_run = self._init_wandb(
                wandb_project, wandb_entity, wandb_mode, run_name, config, bool(config_yaml)
            )
            self._replay_to_wandb(kept)

    def _init_wandb(self, project, entity, mode, run_name, config, attach_config):
        import wandb

        from training import wandb_offline

        # The id persists in the run directory so a resumed (or requeued) job appends to the
        # same W&B run instead of starting a new one.
        id_path = self.run_dir / WANDB_ID_FILE
        if id_path.exists():
            run_id = id_path.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            write_atomic(id_path, run_id + "\n")
        if mode == "offline":
            self._wandb_has = wandb_offline.last_step(self.run_dir / WANDB_DIR, run_id)
        run = wandb.init(
            project=project,
            entity=entity or None,
            mode=mode,
            name=run_name or None,
            id=run_id,
            resume="allow",
            config=config,
            dir=str(self.run_dir),
        )
        if mode != "offline":  # the server says where the resumed run's history ends
            self._wandb_has = run.starting_step - 1
        if attach_config:
            run.save(str(self.run_dir / RUN_CONFIG_FILE), base_path=str(self.run_dir), policy="now")
        return run

    def _replay_to_wandb(self, kept_lines: list[str]) -> None:
        """Send W&B the logged steps it lacks (up to resume_step) from metrics.jsonl."""
        for line in kept_lines:
            record = json.loads(line)
            step = record.pop("step")
            record.pop("time", None)
            if step > self._wandb_has:
                values = _numeric(flatten(record))
                preview = self.run_dir / PREVIEW_FILE.format(step=step)
                if preview.is_file():
                    import wandb

                    values[PREVIEW_TAG] = wandb.Image(str(preview), caption=f"step {step}")
                self._wandb_run.log(values, step=step)
                self._wandb_has = step

    # ---------------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (python numbers, possibly nested) for `step`, and print a line."""
        clash = [k for k in RESERVED_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved by MetricsLogger; rename them")
        self._update_rate(step)
        if not self.is_writer:
            return
        if self._jsonl is None:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed; log before close()")
        values = {str(k): _plain(str(k), v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **values}
        try:
            # Unbuffered, one line per log step: a crash loses at most the line in flight.
            append_whole_line(self._jsonl, json.dumps(record) + "\n")
        except OSError as e:  # a full disk must not end training; this line is lost
            self._disk_trouble(f"{METRICS_FILE} not written", e)

        numeric = _numeric(flatten(values))
        if self._tb is not None:
            try:
                for name, value in numeric.items():
                    self._tb.add_scalar(name, value, global_step=step)
            except Exception as e:  # its writer thread died on a write error (a full disk)
                # It raises that error on every later call: stop writing events this run.
                self._disk_trouble("TensorBoard events no longer written", e)
                self._tb = None
        if self._to_wandb(step):
            import wandb

            by_bin = values.get("val_loss_by_sigma")
            if isinstance(by_bin, Mapping) and by_bin:
                rows = [[int(k.removeprefix("bin")), v] for k, v in by_bin.items()]
                table = wandb.Table(data=rows, columns=["sigma bin", "val loss"])
                numeric["val_loss_by_sigma_chart"] = wandb.plot.bar(
                    table, "sigma bin", "val loss", title="validation loss per sigma bin"
                )
            self._wandb_run.log(numeric, step=step)
        print(self.console_line(step, values), flush=True)

    def _to_wandb(self, step: int) -> bool:
        """Whether `step` goes to W&B: not when the W&B run already holds it."""
        return self._wandb_run is not None and step > self._wandb_has

    def image(self, step: int, tag: str, path: str | os.PathLike) -> None:
        """A PNG (a preview grid) as an image at `step`, to TensorBoard and W&B."""
        if not self.is_writer:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        if self._tb is not None:
            try:
                self._tb.add_image(tag, pixels, global_step=step, dataformats="HWC")
            except Exception as e:
                self._disk_trouble("TensorBoard events no longer written", e)
                self._tb = None
        if self._to_wandb(step):
            import wandb

            self._wandb_run.log({tag: wandb.Image(str(path), caption=f"step {step}")}, step=step)

    def histogram(self, step: int, tag: str, counts: list[float], low: float, high: float) -> None:
        """Counts in equal bins over [low, high] (a histogram accumulated on the device over
        the log window), to TensorBoard and W&B."""
        if not self.is_writer:
            return
        import numpy as np

        counts_np = np.asarray(counts, dtype=np.float64)
        edges = np.linspace(low, high, len(counts_np) + 1)
        n = counts_np.sum()
        if n <= 0:
            return
        centers = (edges[:-1] + edges[1:]) / 2
        if self._tb is not None:
            used = np.nonzero(counts_np)[0]
            try:
                self._tb.add_histogram_raw(
                    tag,
                    min=float(edges[used[0]]),
                    max=float(edges[used[-1] + 1]),
                    num=int(n),
                    sum=float((counts_np * centers).sum()),  # bin centres: the draws are gone
                    sum_squares=float((counts_np * centers**2).sum()),
                    bucket_limits=edges[1:].tolist(),
                    bucket_counts=counts_np.tolist(),
                    global_step=step,
                )
            except Exception as e:
                self._disk_trouble("TensorBoard events no longer written", e)
                self._tb = None
        if self._to_wandb(step):
            import wandb

            hist = wandb.Histogram(np_histogram=(counts_np, edges))
            self._wandb_run.log({tag: hist}, step=step)

    def _disk_trouble(self, what: str, error: Exception) -> None:
        if not self._warned:
            print(f"warning: {what}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        self._warned = True

    def _update_rate(self, step: int) -> None:
        now = self._clock()
        last_step, last_time = self._last_log
        if step > last_step and now > last_time:
            rate = (step - last_step) / (now - last_time)
            if self._steps_per_s is None:
                self._steps_per_s = rate
            else:
                self._steps_per_s += RATE_SMOOTHING * (rate - self._steps_per_s)
        self._last_log = (step, now)

    @property
    def steps_per_s(self) -> float | None:
        """Smoothed optimizer steps per second since the resume step; None before a log."""
        return self._steps_per_s

    def console_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """`step 120/1000 | loss 0.5123 | lr 1.00e-04 | ... | ETA 0:12:34`; missing keys are
        left out."""

        def number(key):
            value = metrics.get(key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                return None
            value = float(value)
            return value if math.isfinite(value) or key == "loss" else None

        parts = [f"step {step}/{self.max_steps}"]
        formats = (
            ("loss", "loss {:.4f}"),
            ("val_loss", "val loss {:.4f}"),
            ("lr", "lr {:.2e}"),
            ("samples_per_s", "{:.1f} samples/s"),
            ("tflops_per_s", "{:.1f} TFLOP/s"),
        )
        for key, fmt in formats:
            if (value := number(key)) is not None:
                parts.append(fmt.format(value))
        if (value := number("mfu")) is not None:
            parts.append(f"MFU {100 * value:.1f}%")
        if (value := number("data_wait_frac")) is not None:
            parts.append(f"data wait {100 * value:.1f}%")
        if self._steps_per_s:
            remaining = max(self.max_steps - step, 0)
            parts.append(f"ETA {format_eta(remaining / self._steps_per_s)}")
        return " | ".join(parts)

    # ---------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception as e:
                self._disk_trouble("the last TensorBoard events not written", e)
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
