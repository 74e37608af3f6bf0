# `make test` and `make demo` set everything up on a fresh Linux machine (CPython 3.11).
# The virtual environment lives in .venv/; it is (re)installed only when requirements.lock or
# pyproject.toml change, so a second `make test` goes straight to the tests.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (tests/conftest.py hands each worker whole modules, all
# Slurm tests to one). 0 = one process: on 2 cores two workers were slower, as the DeepSpeed
# and Slurm tests already keep both cores busy; on a larger machine use e.g. TEST_WORKERS=4.
TEST_WORKERS ?= 0

PIP := $(PY) -m pip

.PHONY: setup slurm-deps browser-deps test demo lint format lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --progress-bar off -r requirements.lock
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) check
	$(PY) -m training.launch  # DeepSpeed's JIT ops, built once here rather than in a test
	touch $@

# The tests marked `slurm` start a real local Slurm cluster (slurm/local_cluster.py): install
# slurm-wlm, munge, slurmdbd and mariadb-server if missing (a no-op when present; without root
# it prints what to install and carries on).
slurm-deps:
	bash scripts/install_slurm.sh

# tests/eval/test_report.py opens mmdit-report's page in a headless Chromium (Debian's
# chromium package; same policy as slurm-deps: a no-op when present, never fails the build).
browser-deps:
	bash scripts/install_browser.sh

test: $(STAMP) slurm-deps browser-deps
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The main job at toy size (scripts/demo.py): data from installed packages -> shards -> tiny
# components with a fitted VAE -> precompute -> DeepSpeed ZeRO-3 pretraining on 2 CPU ranks ->
# samples, eval table, scaling mini-ladder -> diffusers export. ~13 min on 2 cores; stages whose
# outputs exist are skipped (rm -rf runs/demo to start over).
demo: $(STAMP)
	$(PY) scripts/demo.py --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Re-resolve the newest versions allowed by pyproject.toml and rewrite the lock. torch stays at
# the locked version (bump it by hand together with its matching torchvision).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet "$$(grep '^torch===' requirements.lock)" -e '.[test,wandb]'
	{ head -4 requirements.lock; .venv-lock/bin/pip freeze --all --exclude-editable \
	  | grep -v '^pip==' | sed -E 's/^(torch|torchvision)==/\1===/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .venv-lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
