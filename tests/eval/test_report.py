"""mmdit-report: the page is built from a run's files and renders in a real headless browser.

The runs are written by the trainer's own MetricsLogger (metrics.jsonl as training writes it),
with preview PNGs, published checkpoint manifests and an evaluation table written by
mmdit-eval's writer; the training job itself is exercised in tests/training/test_trackers.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.report import main, read_run
from eval.table import write_table
from training.metrics_log import MetricsLogger

STEPS = (10, 20, 30, 40)


def make_run(root: Path, name: str, loss_scale: float) -> Path:
    run_dir = root / name
    with MetricsLogger(run_dir, is_writer=True, max_steps=40) as log:
        log.log(0, {"val_loss": 2.0 * loss_scale, "val_loss_by_sigma": {"bin0": 2.2, "bin1": 1.8}})
        for step in STEPS:
            log.log(
                step,
                {
                    "loss": loss_scale / step,
                    "loss_by_sigma": {"bin0": 1.5 / step, "bin1": 0.5 / step},
                    "samples_seen": step * 8,
                    "train_flops": step * 8 * 1e9,
                    "samples_per_s": 100.0 + step,
                    "tflops_per_s": 0.1,
                    "mfu": 0.3,
                    "data_wait_frac": 0.05,
                    "grad_norm": 1.0 / step,
                    "skipped_steps": 1 if step >= 30 else 0,
                    "bad_samples": {"good": step * 8, "decode_error": 2, "too_small": 1},
                },
            )
            if step % 20 == 0:
                val = {"val_loss": loss_scale / step, "val_loss_by_sigma": {"bin0": 1, "bin1": 2}}
                log.log(step, val)
    rng = np.random.default_rng(len(name))
    for step in (20, 40):
        (run_dir / "previews").mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(run_dir / "previews" / f"step_{step:08d}.png")
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "manifest.json").write_text(json.dumps({"step": step, "world_size": 2}))
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("report")
    a, b = make_run(root, "d2", 1.0), make_run(root, "d4", 0.8)
    rows = [
        {"run": run.name, "step": step, "weights": "ema", "val_loss": 0.5 / step,
         "checkpoint": str(run / "checkpoints" / f"step_{step:08d}"),
         "samples_seen": step * 8, "train_flops": step * 8e9}
        for run in (a, b)
        for step in (20, 40)
    ]  # fmt: skip
    write_table(root / "eval", rows)
    return root, a, b


def _data_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_one_page_compares_runs_with_every_figure_decodable(two_runs, capsys):
    root, a, b = two_runs
    out = root / "report.html"
    assert main([str(a), str(b), "--out", str(out)]) == 0  # eval table found in RUN/../eval
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    images = _data_images(page)
    # 4 figures + 2 previews per run.
    assert len(images) == 4 + 2 * 2
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.width > 50 and img.height > 50
    assert "<img" in page and 'src="http' not in page and "file://" not in page  # self-contained
    for text in ("d2: checkpoints and evaluation", "d4: preview grids", "step 40 (yes)"):
        assert text in page
    assert f"{0.5 / 40:.4g}" in page  # the eval row's val_loss for step 40


def test_eval_rows_belong_to_the_run_whose_checkpoints_they_are(two_runs):
    root, a, b = two_runs
    run = read_run(a, [root / "eval" / "table.json"])
    assert [(r["run"], r["step"]) for r in run.eval_rows] == [("d2", 20), ("d2", 40)]
    assert run.checkpoints == [20, 40] and [s for s, _ in run.previews] == [20, 40]
    # The validation row at step 20 was logged after the training row: both halves are kept.
    row20 = next(r for r in run.rows if r["step"] == 20)
    assert row20["loss"] == pytest.approx(1 / 20) and row20["val_loss"] == pytest.approx(1 / 20)
    assert run.series("val_loss", "samples_seen") == ([160.0, 320.0], [1 / 20, 1 / 40])


def test_a_directory_without_metrics_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert "metrics.jsonl not found" in capsys.readouterr().err


CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({images: imgs.length, broken: bad, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no chromium: `make browser-deps` (Debian: apt-get install chromium)")
    return found


def test_the_page_renders_in_headless_chromium(two_runs, tmp_path):
    root, a, b = two_runs
    page = root / "browser.html"
    assert main([str(a), str(b), "--out", str(page)]) == 0
    # A copy with a checking script: the page itself carries none.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    browser = _chromium()
    flags = ["--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=10000"]
    dom = subprocess.run(
        [browser, *flags, "--enable-logging=stderr", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-3000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check == {"images": 8, "broken": [], "errors": []}
    assert "Uncaught" not in dom.stderr
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert img.size == (1280, 2000)
    assert pixels.std() > 10  # figures drawn, not a blank page
