# bsfind: set-up, demo and tests.
#   make demo   create .venv, install, run a real recommendation on configs/digits-mlp.yaml
#   make test   same set-up, then the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench critical-batch branch-eval equal-time schedule-eval lr-eval clean

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
	$(BIN)/ruff check bsfind tests benchmarks scripts examples
	$(BIN)/mypy bsfind

bench: $(STAMP)
	$(BIN)/python benchmarks/per_example_overhead.py
	$(BIN)/python benchmarks/probe_efficiency.py

# Evidence (docs/validation.md): minutes per problem on 2 cores; outputs in docs/img/.
critical-batch: $(STAMP)
	$(BIN)/python scripts/critical_batch.py configs/digits-mlp.yaml --targets 1.0,0.3,0.1,0.03,0.01 --max-steps 6000 --probe-seconds 8 --window-seconds 2
	$(BIN)/python scripts/critical_batch.py configs/digits-cnn.yaml --targets 1.0,0.3,0.1,0.03,0.01 --max-steps 6000 --probe-seconds 8 --window-seconds 2
	$(BIN)/python scripts/critical_batch.py configs/text-transformer.yaml --set data.kwargs.context=32 --set data.kwargs.max_chars=100000 --set optimizer.lr=6e-3 --batches 8,16,32,64,128,256 --targets 2.8,2.4,2.2,2.0 --max-steps 3000 --eval-examples 128 --probe-seconds 8 --window-points 3 --window-seconds 4 --curv-batch 128

branch-eval: $(STAMP)
	$(BIN)/python scripts/branch_eval.py configs/digits-mlp.yaml
	$(BIN)/python scripts/branch_eval.py configs/digits-cnn.yaml
	$(BIN)/python scripts/branch_eval.py configs/text-transformer.yaml --set model.kwargs.context=64
	$(BIN)/python scripts/branch_stretch_eval.py configs/digits-mlp.yaml
	$(BIN)/python scripts/branch_stretch_eval.py configs/digits-cnn.yaml
	$(BIN)/python scripts/branch_stretch_eval.py configs/text-transformer.yaml --set model.kwargs.context=64
	$(BIN)/python scripts/branch_fit_eval.py configs/digits-mlp.yaml
	$(BIN)/python scripts/branch_fit_eval.py configs/digits-cnn.yaml
	$(BIN)/python scripts/branch_fit_eval.py configs/text-transformer.yaml --set model.kwargs.context=64
	$(BIN)/python scripts/sweep_rule_eval.py digits-mlp digits-cnn text-transformer

equal-time: $(STAMP)
	$(BIN)/python scripts/equal_time.py configs/digits-mlp.yaml --seconds 0.3 --seeds 5
	$(BIN)/python scripts/equal_time.py configs/digits-cnn.yaml --seconds 0.3 --seeds 5
	$(BIN)/python scripts/equal_time.py configs/text-transformer.yaml --set data.kwargs.context=32 --set data.kwargs.max_chars=100000 --seconds 20 --seeds 2 --eval-examples 128

# Needs the critical-batch JSONs (docs/img/critical-batch-<name>.json); minutes per problem.
schedule-eval: $(STAMP)
	$(BIN)/python scripts/schedule_eval.py configs/digits-mlp.yaml --target 0.01
	$(BIN)/python scripts/schedule_eval.py configs/digits-cnn.yaml --target 0.01
	$(BIN)/python scripts/schedule_eval.py configs/text-transformer.yaml --target 2.0

lr-eval: $(STAMP)
	$(BIN)/python scripts/lr_eval.py configs/digits-mlp.yaml
	$(BIN)/python scripts/lr_eval.py configs/digits-cnn.yaml
	$(BIN)/python scripts/lr_eval.py configs/text-transformer.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
