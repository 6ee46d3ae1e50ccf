# bsfind: set-up, demo and tests.
#   make demo   create .venv, install, run a real recommendation on configs/digits-mlp.yaml
#   make test   same set-up, then the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench validate clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q --upgrade pip -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bsfind recommend configs/digits-mlp.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check bsfind tests benchmarks scripts
	$(BIN)/mypy bsfind

bench: $(STAMP)
	$(BIN)/python benchmarks/per_example_overhead.py
	$(BIN)/python benchmarks/probe_efficiency.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
