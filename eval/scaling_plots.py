"""mmdit-scaling's plots (PNG bytes): every run's curve against training compute with the
compute-optimal frontier and its fit, and the final checkpoints against model size with theirs.
Drawn on matplotlib's Agg canvas, without pyplot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # eval.scaling imports this module for its command
    from eval.scaling import Point, PowerLawFit


def human_count(n: float) -> str:
    """1234567 -> '1.23M' for legends."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _size_colours(points: Sequence[Point]) -> dict[str, tuple]:
    """One colour per model size, ordered small (dark) to large (bright)."""
    from matplotlib import colormaps

    models = sorted({p.model for p in points}, key=lambda m: _params_of(points, m))
    cmap = colormaps["viridis"]
    return {m: cmap(i / max(1, len(models) - 1) * 0.9) for i, m in enumerate(models)}


def _params_of(points: Sequence[Point], model: str) -> int:
    return max(p.params for p in points if p.model == model)


def _new_axes(xlabel: str, ylabel: str):
    """A Figure with log-log axes, drawn by the Agg canvas: no pyplot, no global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Losses span well under a decade: plain tick numbers (2.6, 2.8), not 2.6 x 10^0.
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _draw_fit(ax, fit: PowerLawFit | None, x_lo: float, x_hi: float, label: str) -> None:
    """The fitted curve (dashed) and its irreducible term E (dotted), if there is a fit."""
    if fit is None:
        return
    xs = np.geomspace(x_lo, x_hi, 200)
    ax.plot(xs, fit.predict(xs), "k--", lw=1.5, label=label)
    if fit.irreducible and fit.E > 0:
        ax.axhline(fit.E, color="grey", ls=":", lw=1.2, label=f"E = {fit.E:.4g}")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def plot_loss_vs_compute(
    points: Sequence[Point], frontier: Sequence[Point], fit: PowerLawFit | None, metric: str
) -> bytes:
    """Every run's curve (points in step order, a colour per size), the frontier and the fit."""
    fig, ax = _new_axes("training compute C (FLOPs)", metric)
    colours = _size_colours(points)
    labelled = set()
    for run in sorted({p.run for p in points}):
        curve = sorted((p for p in points if p.run == run), key=lambda p: p.step)
        model = curve[0].model
        label = None
        if model not in labelled:
            label = f"{model} ({human_count(_params_of(points, model))} params)"
            labelled.add(model)
        xs, ys = [p.train_flops for p in curve], [p.value for p in curve]
        ax.plot(xs, ys, "o-", ms=3, lw=1, color=colours[model], label=label)
    ax.plot(
        [p.train_flops for p in frontier],
        [p.value for p in frontier],
        "o",
        mfc="none",
        mec="black",
        ms=6,
        label="compute-optimal frontier",
    )
    xs = [p.train_flops for p in points]
    return _finished(fig, ax, fit, xs, "C", f"{metric} vs training compute")


def plot_loss_vs_params(finals: Sequence[Point], fit: PowerLawFit | None, metric: str) -> bytes:
    """Each size's final checkpoint against its parameter count, with the fit."""
    fig, ax = _new_axes("trainable parameters N", metric)
    colours = _size_colours(finals)
    for p in finals:
        label = f"{p.model} ({human_count(p.params)} params, step {p.step})"
        ax.plot([p.params], [p.value], "o", ms=6, color=colours[p.model], label=label)
    xs = [p.params for p in finals]
    return _finished(fig, ax, fit, xs, "N", f"{metric} vs model size (final checkpoints)")


def _finished(fig, ax, fit: PowerLawFit | None, xs: list, symbol: str, title: str) -> bytes:
    """Both plots' ending: the fit over the range of xs (labelled with its formula in symbol),
    the legend and the title; the PNG bytes."""
    label = f"fit: {fit.formula(symbol)}" if fit else ""
    _draw_fit(ax, fit, min(xs), max(xs), label)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _png(fig)
