"""mmdit is the leaf package: it must never pull in the trainer's or launcher's dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_FOR_MMDIT = ["deepspeed", "webdataset", "submitit", "training", "eval", "slurm"]


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    )
    return {name.split(".")[0] for name in json.loads(out.stdout.strip().splitlines()[-1])}


def test_importing_every_mmdit_module_loads_no_forbidden_package():
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "mmdit").rglob("*.py")
    )
    assert "mmdit.conditioning.text" in modules
    statement = "import mmdit\n" + "\n".join(f"import {m}" for m in modules)
    loaded = _modules_loaded_by(statement)
    assert not loaded & set(FORBIDDEN_FOR_MMDIT), sorted(loaded & set(FORBIDDEN_FOR_MMDIT))


def test_the_probe_detects_a_forbidden_import():
    # Guards the test above against passing vacuously (e.g. a broken module list).
    loaded = _modules_loaded_by("import mmdit\nimport training.config")
    assert "training" in loaded


def test_import_linter_contracts_hold():
    # Static check: also catches imports inside functions that the runtime probe never runs.
    exe = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
