"""`mmdit-report`: one self-contained HTML page for one run, or several runs side by side.

    mmdit-report runs/d12 --out runs/d12/report.html
    mmdit-report runs/d12 runs/d18 --eval runs/eval --out report.html

Built from the files a run leaves, no tracker needed: RUN/metrics.jsonl (the training log),
the evaluation table of mmdit-eval (table.json) and the preview grids RUN/previews/*.png.
The page shows the training and validation loss against steps, samples and training FLOPs;
the loss per sigma bin over time (training and validation); throughput, MFU and the share of
time spent waiting for data; the gradient norm and skipped steps; bad samples per reason; the
checkpoints with their evaluation rows; and the preview grids over the steps as a strip.
Figures are PNGs embedded in the page (base64), so the one file can be copied or attached.

Evaluation table: --eval DIR (or DIR/table.json), repeatable; by default RUN/eval and
RUN/../eval are looked at. Rows belong to a run when their checkpoint lies inside it.
"""

# One module for one page: reading the runs, the figures and the HTML that places them.

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mmdit.atomic_file import atomic_path

METRICS_FILE = "metrics.jsonl"
PREVIEWS_DIR = "previews"
EVAL_TABLE = "table.json"
MAX_PREVIEWS = 12  # evenly spaced over the run; a strip of hundreds helps nobody
EVAL_COLUMNS = ("step", "weights", "samples_seen", "train_flops", "val_loss", "fid", "clip_score")


@dataclass
class Run:
    path: Path
    rows: list[dict]  # metrics.jsonl, one row per step (the last write of a step wins)
    eval_rows: list[dict] = field(default_factory=list)
    previews: list[tuple[int, Path]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x, y) of the rows that have both, `key` possibly "a/b" for nested values."""
        xs, ys = [], []
        for row in self.rows:
            xv, yv = _get(row, x), _get(row, key)
            if _number(xv) and _number(yv):
                xs.append(float(xv))
                ys.append(float(yv))
        return xs, ys

    def nested_keys(self, key: str) -> list[str]:
        names: set[str] = set()
        for row in self.rows:
            if isinstance(row.get(key), dict):
                names.update(row[key])
        return sorted(names, key=_natural)


def _get(row: dict, key: str):
    value = row
    for part in key.split("/"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _natural(name: str):
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else -1, name)


# -- reading ----------------------------------------------------------------------------------


def read_run(path: Path, eval_tables: Iterable[Path]) -> Run:
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics} not found: mmdit-report takes run directories (train.run_dir of "
            "mmdit-train, holding metrics.jsonl)"
        )
    by_step: dict[int, dict] = {}
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if isinstance(row, dict) and isinstance(row.get("step"), int) and "event" not in row:
            by_step.setdefault(row["step"], {}).update(row)
    run = Run(path, [by_step[s] for s in sorted(by_step)])
    previews = []
    for png in (path / PREVIEWS_DIR).glob("step_*.png"):
        step = png.stem.removeprefix("step_")
        if step.isdigit():
            previews.append((int(step), png))
    run.previews = sorted(previews)
    run.checkpoints = sorted(
        int(p.name.removeprefix("step_"))
        for p in (path / "checkpoints").glob("step_*")
        if p.name.removeprefix("step_").isdigit() and (p / "manifest.json").is_file()
    )
    root = path.resolve()
    for table in eval_tables:
        for row in json.loads(table.read_text()):
            checkpoint = Path(str(row.get("checkpoint", "")))
            if checkpoint.is_absolute() and checkpoint.resolve().is_relative_to(root):
                run.eval_rows.append(row)
    run.eval_rows.sort(key=lambda r: (r.get("step") or 0, str(r.get("weights"))))
    return run


def find_eval_tables(runs: list[Path], given: list[Path]) -> list[Path]:
    tables = []
    for p in given:
        table = p / EVAL_TABLE if p.is_dir() else p
        if not table.is_file():
            raise FileNotFoundError(f"--eval {p}: no {EVAL_TABLE} there (mmdit-eval --out DIR)")
        tables.append(table)
    if not given:
        for run in runs:
            for candidate in (run / "eval" / EVAL_TABLE, run.parent / "eval" / EVAL_TABLE):
                if candidate.is_file():
                    tables.append(candidate)
    return list(dict.fromkeys(t.resolve() for t in tables))


# -- figures ----------------------------------------------------------------------------------


def _figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot(ax, runs: list[Run], key: str, x: str = "step", style: str = "-", label: str = ""):
    drawn = False
    for i, run in enumerate(runs):
        xs, ys = run.series(key, x)
        if xs:
            name = f"{run.name} {label}".strip() if len(runs) > 1 or label else run.name
            dots = {"marker": "."} if len(xs) < 30 and "o" not in style else {}
            ax.plot(xs, ys, style, color=f"C{i}", label=name, **dots)
            drawn = True
    return drawn


def loss_figure(runs: list[Run]) -> bytes:
    fig, axes = _figure(3)
    for ax, x, title in zip(
        axes[0],
        ("step", "samples_seen", "train_flops"),
        ("optimizer steps", "samples seen", "training FLOPs"),
        strict=True,
    ):
        _plot(ax, runs, "loss", x, "-", "train")
        _plot(ax, runs, "val_loss", x, "o--", "val (EMA)")
        ax.set_xlabel(title)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if x == "train_flops":
            ax.set_xscale("log") if _any_positive(runs, x) else None
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {x} logged", ha="center", transform=ax.transAxes)
    return _png(fig)


def _any_positive(runs: list[Run], key: str) -> bool:
    return any(v > 0 for run in runs for v in run.series(key)[1])


def sigma_figure(runs: list[Run]) -> bytes:
    from matplotlib import colormaps

    fig, axes = _figure(2, len(runs))
    cmap = colormaps["viridis"]
    for r, run in enumerate(runs):
        for ax, key, title in zip(
            axes[r],
            ("loss_by_sigma", "val_loss_by_sigma"),
            ("training loss", "validation loss (EMA)"),
            strict=True,
        ):
            bins = run.nested_keys(key)
            for k, name in enumerate(bins):
                xs, ys = run.series(f"{key}/{name}")
                color = cmap(k / max(len(bins) - 1, 1))
                ax.plot(xs, ys, "-o" if len(xs) < 30 else "-", color=color, label=name, ms=3)
            ax.set_title(f"{run.name}: {title} per sigma bin", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if bins:
                ax.legend(fontsize=6, ncol=2, title="low sigma -> high", title_fontsize=6)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", transform=ax.transAxes)
    return _png(fig)


def throughput_figure(runs: list[Run]) -> bytes:
    fig, axes = _figure(3, 2)
    panels = (
        ("samples_per_s", "samples / s"),
        ("tflops_per_s", "TFLOP/s per device"),
        ("mfu", "MFU"),
        ("data_wait_frac", "share of time waiting for data"),
        ("grad_norm", "gradient norm"),
        ("skipped_steps", "skipped steps (total)"),
    )
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        if not _plot(ax, runs, key):
            ax.text(0.5, 0.5, "not logged", ha="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 and ax.lines:
            ax.legend(fontsize=7)
    return _png(fig)


def bad_samples_figure(runs: list[Run]) -> bytes:
    fig, axes = _figure(len(runs), width=5.0)
    for ax, run in zip(axes[0], runs, strict=True):
        last = next((r["bad_samples"] for r in reversed(run.rows) if "bad_samples" in r), {})
        reasons = {k: v for k, v in last.items() if k != "good"}
        good = last.get("good", 0)
        ax.barh(list(reasons) or ["(none)"], list(reasons.values()) or [0], color="C3")
        ax.set_title(f"{run.name}: bad samples per reason ({good} good)", fontsize=9)
        ax.set_xlabel("samples (whole run)")
        ax.grid(alpha=0.3, axis="x")
    return _png(fig)


# -- the page ---------------------------------------------------------------------------------


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{encoded}">'


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def checkpoint_table(run: Run) -> str:
    eval_by_step: dict[int, list[dict]] = {}
    for row in run.eval_rows:
        eval_by_step.setdefault(int(row.get("step") or 0), []).append(row)
    steps = sorted(set(run.checkpoints) | set(eval_by_step))
    if not steps:
        return "<p>No checkpoints and no evaluation rows.</p>"
    columns = [c for c in EVAL_COLUMNS if any(c in r for r in run.eval_rows)] or ["step"]
    head = "".join(f"<th>{c}</th>" for c in ["checkpoint", *columns[1:]])
    body = []
    for step in steps:
        published = "yes" if step in run.checkpoints else "removed"
        for row in eval_by_step.get(step) or [{"step": step}]:
            cells = [f"step {step} ({published})"] + [_fmt(row.get(c)) for c in columns[1:]]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def preview_strip(run: Run) -> str:
    previews = run.previews
    if not previews:
        return "<p>No preview grids (train.preview_every=0).</p>"
    if len(previews) > MAX_PREVIEWS:
        picks = {round(i * (len(previews) - 1) / (MAX_PREVIEWS - 1)) for i in range(MAX_PREVIEWS)}
        previews = [previews[i] for i in sorted(picks)]
    cells = [
        f"<figure>{_img(png.read_bytes(), f'{run.name} preview at step {step}')}"
        f"<figcaption>step {step}</figcaption></figure>"
        for step, png in previews
    ]
    return f'<div class="strip">{"".join(cells)}</div>'


def summary_line(run: Run) -> str:
    last = run.rows[-1] if run.rows else {}
    val = [r for r in run.rows if _number(r.get("val_loss"))]
    parts = [f"{len(run.rows)} logged steps, last step {last.get('step', '-')}"]
    if _number(last.get("loss")):
        parts.append(f"loss {last['loss']:.4f}")
    if val:
        parts.append(f"val loss {val[-1]['val_loss']:.4f} at step {val[-1]['step']}")
    return html.escape(", ".join(parts))


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
img { max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
.strip { display: flex; overflow-x: auto; gap: 6px; }
.strip figure { margin: 0; text-align: center; font-size: 0.8em; }
.strip img { width: 160px; image-rendering: pixelated; }
"""


def build_page(runs: list[Run], title: str) -> str:
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<ul>"
        + "".join(
            f"<li><b>{html.escape(r.name)}</b> ({html.escape(str(r.path))}): {summary_line(r)}</li>"
            for r in runs
        )
        + "</ul>",
        "<h2>Loss</h2>",
        _img(loss_figure(runs), "loss against steps, samples and FLOPs"),
        "<h2>Loss per sigma bin</h2>",
        _img(sigma_figure(runs), "loss per sigma bin over time"),
        "<h2>Throughput, MFU, data wait, gradient norm</h2>",
        _img(throughput_figure(runs), "throughput, MFU, data wait, gradient norm"),
        "<h2>Bad samples</h2>",
        _img(bad_samples_figure(runs), "bad samples per reason"),
    ]
    for run in runs:
        sections += [
            f"<h2>{html.escape(run.name)}: checkpoints and evaluation</h2>",
            checkpoint_table(run),
            f"<h2>{html.escape(run.name)}: preview grids</h2>",
            preview_strip(run),
        ]
    body = "\n".join(sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def write_report(run_dirs: list[Path], out: Path, eval_dirs: list[Path] = ()) -> Path:
    tables = find_eval_tables(run_dirs, list(eval_dirs))
    runs = [read_run(p, tables) for p in run_dirs]
    title = "Run report: " + ", ".join(r.name for r in runs)
    with atomic_path(out) as tmp:  # a browser reloading the page never gets half of it
        tmp.write_text(build_page(runs, title), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="mmdit-report",
        description=parts[0],
        epilog="\n\n".join(parts[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    parser.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    parser.add_argument(
        "--eval",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="mmdit-eval output directory (or its table.json); repeatable",
    )
    args = parser.parse_args(argv)
    try:
        out = write_report(args.runs, args.out, args.eval)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(f"report: {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
