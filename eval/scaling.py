"""`mmdit-scaling`: power-law fits and plots of a metric against training compute and model size.

    mmdit-scaling --table runs/eval/table.csv --out runs/scaling
    mmdit-scaling --table runs/eval/table.json --out runs/scaling --metric val_loss_bin_3
    mmdit-scaling --table runs/eval/table.csv --out runs/scaling --weights raw --no-irreducible

Reads the table `mmdit-eval` writes (CSV, or JSON: a list of row objects; one row per
checkpoint x weights) and fits, in log space:

  loss vs compute     L(C) = E + A * C^-alpha  on the compute-optimal frontier
  loss vs parameters  L(N) = E + B * N^-beta   on each model size's final checkpoint

The frontier is the Pareto (monotone) envelope of every checkpoint of every run: sorted by
train_flops, a point is on it when its metric is lower than that of every point that used at
most as much compute. For each frontier point fits.json names the model size that attains it
and, with at least 2 sizes on it, fits N_opt(C) = k * C^a (the compute-optimal model size).

--no-irreducible drops E (a pure power law; 2 points suffice instead of 3). A fit without
enough points is skipped with a message; the command fails only when no fit can be made.
Writes OUT/fits.json, OUT/loss_vs_compute.png and OUT/loss_vs_params.png.
"""

# One module for one command: the table's rows -> points -> fits -> fits.json and summary; the
# plots are eval/scaling_plots.py.

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from eval.scaling_plots import plot_loss_vs_compute, plot_loss_vs_params
from mmdit.atomic_file import write_atomic

# Columns every table must have; the metric column is added by --metric.
REQUIRED_COLUMNS = ("run", "model", "params", "step", "train_flops", "weights")
# Chinchilla's robust loss: Huber on log residuals with delta 1e-3. For exact power-law data it
# has the same minimum as least squares; for real curves it discounts the odd bad checkpoint.
HUBER_DELTA = 1e-3
# Starting points: E as a fraction of the smallest metric value, alpha over typical exponents.
E_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9)
ALPHA_STARTS = (0.05, 0.1, 0.3, 0.6, 1.0)
TINY_E = 1e-6  # "E = 0" start, relative to the smallest metric value (E = exp(e) is never 0)


class ScalingError(ValueError):
    """A table or fit problem; the message names the bad input and the fix."""


# -- reading the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One checkpoint's metric value, with what it cost."""

    run: str
    model: str
    params: int
    step: int
    train_flops: float
    value: float

    def as_row(self, metric: str) -> dict:
        return {
            "run": self.run,
            "model": self.model,
            "params": self.params,
            "step": self.step,
            "train_flops": self.train_flops,
            metric: self.value,
        }


def read_table(path: str | Path) -> list[dict]:
    """Rows of a CSV or JSON eval table as dicts (values as written: strings for CSV)."""
    path = Path(path)
    if not path.is_file():
        raise ScalingError(
            f"table '{path}' not found; pass the table mmdit-eval wrote, "
            "e.g. --table runs/eval/table.csv"
        )
    text = path.read_text()
    if path.suffix.lower() == ".json":
        return _json_rows(text, path)
    return list(csv.DictReader(io.StringIO(text)))


def _json_rows(text: str, path: Path) -> list[dict]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScalingError(f"table '{path}' is not valid JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ScalingError(f"table '{path}' must be a JSON list of row objects")
    return rows


def check_columns(rows: list[dict], metric: str, source: str) -> None:
    """Fail with the missing column names (and the present ones) before any parsing."""
    if not rows:
        raise ScalingError(f"table '{source}' has no rows; run mmdit-eval on some checkpoints")
    present = set().union(*(r.keys() for r in rows))
    missing = [c for c in (*REQUIRED_COLUMNS, metric) if c not in present]
    if missing:
        raise ScalingError(
            f"table '{source}' lacks column(s) {', '.join(missing)}; it has "
            f"{', '.join(sorted(present))}. Pass a table written by mmdit-eval, or pick "
            "another --metric"
        )


def _number(value) -> float:
    """A cell as a float; empty cells and None (metric not computed) become NaN."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    return float(value)


def select_points(rows: list[dict], metric: str, weights: str, source: str) -> list[Point]:
    """The rows of one weights kind with a positive metric value and positive train_flops."""
    check_columns(rows, metric, source)
    chosen = [r for r in rows if str(r["weights"]) == weights]
    if not chosen:
        have = sorted({str(r["weights"]) for r in rows})
        raise ScalingError(
            f"table '{source}' has no rows with weights '{weights}'; it has "
            f"{', '.join(have)}: pass --weights {have[0]}"
        )
    points = []
    for i, r in enumerate(chosen):
        try:
            point = Point(
                run=str(r["run"]),
                model=str(r["model"]),
                params=int(_number(r["params"])),
                step=int(_number(r["step"])),
                train_flops=_number(r["train_flops"]),
                value=_number(r[metric]),
            )
        except (TypeError, ValueError) as e:
            raise ScalingError(f"table '{source}': {weights} row {i} is malformed ({e})") from None
        # Log axes: a metric that was not computed, or a step-0 checkpoint, cannot be placed.
        if all(math.isfinite(v) and v > 0 for v in (point.value, point.train_flops)):
            points.append(point)
    if not points:
        raise ScalingError(
            f"table '{source}': no '{weights}' row has a positive value of '{metric}'; "
            "evaluate that metric with mmdit-eval or choose another --metric"
        )
    return points


# -- which points each fit uses ---------------------------------------------------------------


def compute_frontier(points: Sequence[Point]) -> list[Point]:
    """The compute-optimal frontier: points no other point beats at equal or lower compute.

    Sorted by train_flops (ties: lowest value first), a point joins when its value is strictly
    below the running minimum. This monotone envelope is the lowest metric reachable with at
    most that much compute, whichever model size reaches it.
    """
    frontier: list[Point] = []
    best = math.inf
    for p in sorted(points, key=lambda p: (p.train_flops, p.value)):
        if p.train_flops > 0 and p.value < best:
            frontier.append(p)
            best = p.value
    return frontier


def final_points(points: Sequence[Point]) -> list[Point]:
    """Each model size's final checkpoint (largest step; ties: lowest value), by params."""
    finals: dict[str, Point] = {}
    for p in points:
        old = finals.get(p.model)
        if old is None or (p.step, -p.value) > (old.step, -old.value):
            finals[p.model] = p
    return sorted(finals.values(), key=lambda p: p.params)


# -- fitting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLawFit:
    """metric = E + A * x^-alpha (E = 0 for a pure power law)."""

    E: float
    A: float
    alpha: float
    n_points: int
    rmse_log: float  # root-mean-square of log(fit) - log(data)
    irreducible: bool

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(x, dtype=float), -self.alpha)

    def formula(self, symbol: str) -> str:
        # A negative alpha (loss rising with x, e.g. an undertrained larger model) reads ^+.
        sign = "-" if self.alpha >= 0 else "+"
        term = f"{self.A:.4g} * {symbol}^{sign}{abs(self.alpha):.4g}"
        return f"{self.E:.4g} + {term}" if self.irreducible else term

    def to_json(self, x_name: str, symbol: str) -> dict:
        return {
            "form": f"E + A * {symbol}^-alpha" if self.irreducible else f"A * {symbol}^-alpha",
            "x": x_name,
            "coefficients": {"E": self.E, "A": self.A, "alpha": self.alpha},
            "formula": self.formula(symbol),
            "n_points": self.n_points,
            "rmse_log": self.rmse_log,
        }


def fit_power_law(x, y, *, irreducible: bool = True, what: str = "fit") -> PowerLawFit:
    """Fit y = E + A x^-alpha in log space; E >= 0, A > 0, alpha > 0 by construction.

    x is centred on its geometric mean (u = ln x - mean ln x) so compute values of 1e15..1e21
    give the optimiser numbers of order one; A is mapped back afterwards. Deterministic: every
    start of a fixed grid is run and the lowest cost wins.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _check_points(x, y, irreducible, what)
    log_x0 = float(np.mean(np.log(x)))
    u, log_y = np.log(x) - log_x0, np.log(y)
    if irreducible:
        E, log_a, alpha = _fit_with_floor(u, log_y)
    else:
        slope, log_a = np.polyfit(u, log_y, 1)
        E, alpha = 0.0, float(-slope)
    A = math.exp(log_a + alpha * log_x0)
    fit = PowerLawFit(E, A, alpha, len(x), 0.0, irreducible)
    rmse = float(np.sqrt(np.mean((np.log(fit.predict(x)) - log_y) ** 2)))
    return PowerLawFit(E, A, alpha, len(x), rmse, irreducible)


def _check_points(x: np.ndarray, y: np.ndarray, irreducible: bool, what: str) -> None:
    if x.shape != y.shape or x.ndim != 1:
        raise ScalingError(f"{what}: x and y must be 1-D and of equal length")
    if np.any(x <= 0) or np.any(y <= 0) or not np.all(np.isfinite(x) & np.isfinite(y)):
        raise ScalingError(f"{what}: x and y must be finite and positive for a log-space fit")
    needed = 3 if irreducible else 2
    distinct = len(np.unique(x))
    if distinct < needed:
        hint = (
            "add model sizes or checkpoints, or pass --no-irreducible (a pure power law needs 2)"
            if irreducible
            else "add model sizes or checkpoints"
        )
        raise ScalingError(
            f"{what}: {len(x)} point(s) at {distinct} distinct x value(s); "
            f"{'E + A * x^-alpha' if irreducible else 'A * x^-alpha'} needs at least "
            f"{needed} distinct x values: {hint}"
        )


def _fit_with_floor(u: np.ndarray, log_y: np.ndarray) -> tuple[float, float, float]:
    """(E, log A', alpha) of y = E + A' e^(-alpha u), with E = e^e and alpha = e^s."""

    def residuals(theta):
        e, log_a, s = theta
        return np.logaddexp(e, log_a - np.exp(s) * u) - log_y  # log(E + A' e^-alpha u)

    best = None
    y_min = float(np.exp(log_y.min()))
    for fraction in E_FRACTIONS:
        floor = max(fraction, TINY_E) * y_min
        log_rest = float(np.mean(np.log(np.exp(log_y) - floor)))  # mean(u) = 0
        for alpha in ALPHA_STARTS:
            start = np.array([math.log(floor), log_rest, math.log(alpha)])
            result = least_squares(
                residuals,
                start,
                loss="huber",
                f_scale=HUBER_DELTA,
                xtol=1e-15,
                ftol=1e-15,
                gtol=1e-15,
                max_nfev=2000,
            )
            if best is None or result.cost < best.cost:
                best = result
    e, log_a, s = best.x
    return float(np.exp(e)), float(log_a), float(np.exp(s))


def fit_n_opt(frontier: Sequence[Point]) -> dict:
    """N_opt(C) = k * C^a by least squares in log space over the frontier points.

    A rough estimate: each frontier point says which size was best at that compute. Needs at
    least 2 sizes on the frontier; otherwise the result says why there is no fit.
    """
    sizes = sorted({p.params for p in frontier})
    if len(sizes) < 2:
        return {"fit": None, "reason": f"{len(sizes)} model size(s) on the frontier; need 2"}
    log_c = np.log([p.train_flops for p in frontier])
    log_n = np.log([p.params for p in frontier])
    a, log_k = np.polyfit(log_c, log_n, 1)
    return {
        "fit": {
            "form": "N_opt = k * C^a",
            "k": float(math.exp(log_k)),
            "a": float(a),
            "n_points": len(frontier),
            "n_sizes": len(sizes),
        }
    }


# -- the command ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """Everything the fits produced, ready to write."""

    points: list[Point]
    frontier: list[Point]
    finals: list[Point]
    compute_fit: PowerLawFit | None
    params_fit: PowerLawFit | None
    errors: dict[str, str]  # fit name -> why it was skipped


def analyse(points: list[Point], irreducible: bool = True) -> Analysis:
    """Both fits; a fit lacking points is recorded in `errors` instead of raising."""
    frontier, finals = compute_frontier(points), final_points(points)
    fits, errors = {}, {}
    for name, chosen, attr in (
        ("loss_vs_compute", frontier, "train_flops"),
        ("loss_vs_params", finals, "params"),
    ):
        xs, ys = [getattr(p, attr) for p in chosen], [p.value for p in chosen]
        try:
            fits[name] = fit_power_law(xs, ys, irreducible=irreducible, what=name)
        except ScalingError as e:
            errors[name] = str(e)
    return Analysis(
        points,
        frontier,
        finals,
        fits.get("loss_vs_compute"),
        fits.get("loss_vs_params"),
        errors,
    )


def fits_json(result: Analysis, metric: str, weights: str, table: str) -> dict:
    """The fits.json document: each fit with the rows it used, and the compute-optimal sizes."""
    fits = {}
    for name, fit, x_name, symbol, used in (
        ("loss_vs_compute", result.compute_fit, "train_flops", "C", result.frontier),
        ("loss_vs_params", result.params_fit, "params", "N", result.finals),
    ):
        entry = fit.to_json(x_name, symbol) if fit else {"error": result.errors[name]}
        entry["rows"] = [p.as_row(metric) for p in used]
        fits[name] = entry
    frontier = [p.as_row(metric) for p in result.frontier]  # which size attains each point
    return {
        "table": table,
        "metric": metric,
        "weights": weights,
        "n_rows": len(result.points),
        "fits": fits,
        "compute_optimal": {"frontier": frontier, **fit_n_opt(result.frontier)},
    }


def summary(result: Analysis, doc: dict) -> str:
    """The few lines printed to stdout."""
    lines = [
        f"{doc['metric']} ({doc['weights']} weights): {doc['n_rows']} rows from {doc['table']}"
    ]
    for name, fit, symbol in (
        ("loss_vs_compute", result.compute_fit, "C"),
        ("loss_vs_params", result.params_fit, "N"),
    ):
        if fit is None:
            lines.append(f"  {name:<16} skipped: {result.errors[name]}")
        else:
            lines.append(
                f"  {name:<16} L({symbol}) = {fit.formula(symbol)}   "
                f"({fit.n_points} points, log-RMSE {fit.rmse_log:.3g})"
            )
    n_opt = doc["compute_optimal"]["fit"]
    if n_opt:
        lines.append(
            f"  {'compute-optimal':<16} N_opt(C) = {n_opt['k']:.4g} * C^{n_opt['a']:.4g}   "
            f"({n_opt['n_sizes']} sizes on the frontier)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="mmdit-scaling",
        description=doc[0],
        epilog="\n\n".join(doc[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--table", required=True, help="mmdit-eval's table (.csv or .json)")
    parser.add_argument("--out", required=True, help="directory for fits.json and the plots")
    parser.add_argument(
        "--metric",
        default="val_loss",
        help="lower-is-better column to fit (default val_loss; e.g. val_loss_bin_0, fid)",
    )
    parser.add_argument(
        "--weights", default="ema", help="which weights' rows to use: ema (default) or raw"
    )
    parser.add_argument(
        "--no-irreducible",
        dest="irreducible",
        action="store_false",
        help="fit A * x^-alpha without the irreducible term E",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.metric == "clip_score":
        parser.error("clip_score grows with scale; fit a lower-is-better metric (val_loss, fid)")
    try:
        points = select_points(read_table(args.table), args.metric, args.weights, args.table)
    except ScalingError as e:
        parser.error(str(e))
    result = analyse(points, irreducible=args.irreducible)
    if result.compute_fit is None and result.params_fit is None:
        parser.error("no fit could be made:\n  " + "\n  ".join(result.errors.values()))
    doc = fits_json(result, args.metric, args.weights, args.table)
    out = Path(args.out)
    write_atomic(out / "fits.json", json.dumps(doc, indent=2) + "\n")
    plot = plot_loss_vs_compute(result.points, result.frontier, result.compute_fit, args.metric)
    write_atomic(out / "loss_vs_compute.png", plot)
    write_atomic(
        out / "loss_vs_params.png",
        plot_loss_vs_params(result.finals, result.params_fit, args.metric),
    )
    print(summary(result, doc))
    print(f"wrote {out / 'fits.json'}, loss_vs_compute.png and loss_vs_params.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
