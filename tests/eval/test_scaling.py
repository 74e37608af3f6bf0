"""mmdit-scaling: power-law recovery, the compute-optimal frontier and the command end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from eval import scaling
from eval.scaling import Point, ScalingError, compute_frontier, final_points, fit_power_law

COMPUTE = np.geomspace(1e15, 1e21, 25)  # six decades, as a real ladder spans


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= 0.01 * abs(want)


@pytest.mark.parametrize(
    "E, A, alpha",
    [
        (1.7, 3e5, 0.3),
        (0.5, 2e3, 0.15),
        (0.01, 1e8, 0.45),  # small irreducible term
        (1e-3, 50.0, 0.08),  # nearly a pure power law
        (2.0, 1e20, 1.0),
    ],
)
def test_compute_fit_recovers_noise_free_power_law(E, A, alpha):
    fit = fit_power_law(COMPUTE, E + A * COMPUTE**-alpha)
    assert _close(fit.E, E) and _close(fit.A, A) and _close(fit.alpha, alpha), fit
    assert fit.rmse_log < 1e-6 and fit.n_points == len(COMPUTE)


@pytest.mark.parametrize("E, B, beta", [(0.4, 30.0, 0.25), (0.05, 200.0, 0.4)])
def test_params_fit_recovers_noise_free_power_law(E, B, beta):
    n = np.array([1.9e6, 1e7, 3.3e7, 1.1e8, 2.5e8, 8.6e8, 2e9, 8e9])
    fit = fit_power_law(n, E + B * n**-beta)
    assert _close(fit.E, E) and _close(fit.A, B) and _close(fit.alpha, beta), fit


def test_pure_power_law_needs_two_points():
    x = np.array([1e16, 1e19])
    fit = fit_power_law(x, 7e3 * x**-0.2, irreducible=False)
    assert fit.E == 0 and _close(fit.A, 7e3) and _close(fit.alpha, 0.2)


def test_too_few_points_names_the_count_and_the_fix():
    x = np.array([1e16, 1e17, 1e17])
    with pytest.raises(
        ScalingError, match=r"3 point\(s\) at 2 distinct.*at least 3.*no-irreducible"
    ):
        fit_power_law(x, 1 + x**-0.1, what="loss_vs_compute")
    with pytest.raises(ScalingError, match=r"1 point\(s\).*at least 2"):
        fit_power_law([1e16], [2.0], irreducible=False)


def _p(run, step, flops, value, model="d2", params=100) -> Point:
    return Point(run, model, params, step, flops, value)


def test_frontier_is_the_monotone_envelope_across_sizes():
    small = [
        _p("s", 1, 1e15, 3.0),
        _p("s", 2, 2e15, 2.5),
        _p("s", 3, 4e15, 2.3),
        _p("s", 4, 8e15, 2.25),
    ]
    big = [
        _p("b", 1, 2e15, 2.8, "d4", 400),  # beaten by small at 2e15
        _p("b", 2, 4e15, 2.2, "d4", 400),  # beats small at 4e15
        _p("b", 3, 8e15, 2.0, "d4", 400),
        _p("b", 4, 1.6e16, 2.1, "d4", 400),  # worse than its own earlier point
    ]
    frontier = compute_frontier(big + small)
    assert [(p.run, p.step) for p in frontier] == [("s", 1), ("s", 2), ("b", 2), ("b", 3)]


def test_rows_without_a_value_or_compute_are_ignored():
    rows = [
        {"run": "r", "model": "d2", "params": "10", "step": "0", "train_flops": "0",
         "weights": "ema", "val_loss": "2.0"},
        {"run": "r", "model": "d2", "params": "10", "step": "5", "train_flops": "1e15",
         "weights": "ema", "val_loss": ""},
        {"run": "r", "model": "d2", "params": "10", "step": "9", "train_flops": "2e15",
         "weights": "ema", "val_loss": "1.5"},
    ]  # fmt: skip
    (point,) = scaling.select_points(rows, "val_loss", "ema", "t.csv")
    assert point == Point("r", "d2", 10, 9, 2e15, 1.5)


def test_final_points_take_each_sizes_largest_step():
    points = [_p("s1", 5, 1e15, 3.0), _p("s2", 9, 2e15, 2.9), _p("b", 3, 5e15, 2.0, "d4", 400)]
    assert [(p.run, p.step) for p in final_points(points)] == [("s2", 9), ("b", 3)]


# -- the command ------------------------------------------------------------------------------

SIZES = {"d2": 2e6, "d4": 1e7, "d6": 3e7, "d9": 1e8}


def _loss(n: float, samples: float) -> float:
    return 0.3 + 40.0 * n**-0.3 + 300.0 * samples**-0.35  # Chinchilla-shaped L(N, D)


def _table_rows() -> list[dict]:
    rows = []
    for model, n in SIZES.items():
        for step in range(500, 5001, 500):
            samples = step * 256
            base = {
                "run": f"{model}_1e15",
                "model": model,
                "depth": int(model[1:]),
                "params": int(n),
                "step": step,
                "samples_seen": samples,
                "train_flops": 6.0 * n * samples,
                "seed": 0,
                "samples": 512,
                "fid": "",
                "clip_score": "",
            }
            loss = _loss(n, samples)
            rows.append({**base, "weights": "ema", "val_loss": loss, "val_loss_bin_0": 2 * loss})
            rows.append({**base, "weights": "raw", "val_loss": 5 * loss, "val_loss_bin_0": ""})
    return rows


@pytest.fixture
def csv_table(tmp_path):
    path = tmp_path / "table.csv"
    rows = _table_rows()
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def json_table(tmp_path):
    path = tmp_path / "table.json"
    rows = [{k: (None if v == "" else v) for k, v in r.items()} for r in _table_rows()]
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("table", ["csv_table", "json_table"])
def test_cli_writes_fits_and_plots(table, request, tmp_path, capsys):
    path = request.getfixturevalue(table)
    out = tmp_path / "scaling"
    assert scaling.main(["--table", str(path), "--out", str(out)]) == 0
    for name in ("loss_vs_compute.png", "loss_vs_params.png"):
        png = out / name
        assert png.stat().st_size > 0
        with Image.open(png) as img:
            img.load()
            assert img.format == "PNG" and img.width > 100 and img.height > 100
    doc = json.loads((out / "fits.json").read_text())
    assert doc["metric"] == "val_loss" and doc["weights"] == "ema" and doc["n_rows"] == 40
    for name, x in (("loss_vs_compute", "train_flops"), ("loss_vs_params", "params")):
        fit = doc["fits"][name]
        assert fit["x"] == x and set(fit["coefficients"]) == {"E", "A", "alpha"}
        assert all(v > 0 for v in fit["coefficients"].values())
        assert fit["n_points"] == len(fit["rows"]) >= 3
    # Only ema rows are used: every value used is the ema loss of its row, not 5x (raw).
    for row in doc["fits"]["loss_vs_params"]["rows"]:
        assert math.isclose(row["val_loss"], _loss(row["params"], row["step"] * 256))
    finals = doc["fits"]["loss_vs_params"]["rows"]
    assert [r["model"] for r in finals] == list(SIZES) and {r["step"] for r in finals} == {5000}
    optimal = doc["compute_optimal"]
    assert optimal["fit"]["n_sizes"] >= 2 and optimal["fit"]["a"] > 0
    assert {f["model"] for f in optimal["frontier"]} <= set(SIZES)
    printed = capsys.readouterr().out
    assert "loss_vs_compute  L(C) =" in printed and "loss_vs_params   L(N) =" in printed


def test_cli_raw_weights_and_no_irreducible(csv_table, tmp_path):
    out = tmp_path / "raw"
    argv = ["--table", str(csv_table), "--out", str(out), "--weights", "raw", "--no-irreducible"]
    assert scaling.main(argv) == 0
    doc = json.loads((out / "fits.json").read_text())
    assert doc["weights"] == "raw" and doc["fits"]["loss_vs_compute"]["coefficients"]["E"] == 0
    row = doc["fits"]["loss_vs_params"]["rows"][0]
    assert math.isclose(row["val_loss"], 5 * _loss(row["params"], row["step"] * 256))


def test_cli_skips_a_fit_without_enough_points(csv_table, tmp_path, capsys):
    rows = [r for r in _table_rows() if r["model"] in ("d2", "d4")]
    path = tmp_path / "two_sizes.json"
    path.write_text(json.dumps(rows))
    assert scaling.main(["--table", str(path), "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "fits.json").read_text())
    assert "2 distinct x value(s)" in doc["fits"]["loss_vs_params"]["error"]
    assert "coefficients" in doc["fits"]["loss_vs_compute"]
    assert "loss_vs_params   skipped:" in capsys.readouterr().out


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        scaling.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_exit_2_with_the_fix(csv_table, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    err = _fails(["--table", str(tmp_path / "nope.csv"), *out], capsys)
    assert "nope.csv' not found" in err
    err = _fails(["--table", str(csv_table), "--weights", "swa", *out], capsys)
    assert "no rows with weights 'swa'" in err and "ema, raw" in err
    err = _fails(["--table", str(csv_table), "--metric", "val_los", *out], capsys)
    assert "lacks column(s) val_los" in err
    err = _fails(["--table", str(csv_table), "--metric", "fid", *out], capsys)
    assert "no 'ema' row has a positive value of 'fid'" in err
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_table_rows()[:1]))
    err = _fails(["--table", str(one), *out], capsys)
    assert "no fit could be made" in err and "1 point(s)" in err
    assert not (tmp_path / "o").exists()


def test_missing_required_column_is_named(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps([{k: v for k, v in r.items() if k != "train_flops"} for r in _table_rows()])
    )
    err = _fails(["--table", str(path), "--out", str(tmp_path / "o")], capsys)
    assert "lacks column(s) train_flops" in err
