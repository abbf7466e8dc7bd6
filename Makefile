# aifa-broker — the two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SLURM_RELEASE ?= 22.05
export AIFA_BROKER_DATA_DIR ?= $(CURDIR)/.data

.PHONY: run test venv lint typecheck slurm-up slurm-down test-unit clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/aifa-broker demo
	$(VENV)/bin/aifa-broker serve

test: venv
	./scripts/test.sh

test-unit: venv
	$(PY) -m pytest tests/unit -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

slurm-up:
	deploy/slurm-dev/up.sh $(SLURM_RELEASE)

slurm-down:
	deploy/slurm-dev/down.sh $(SLURM_RELEASE)

clean:
	rm -rf $(VENV) .data .pytest_cache
