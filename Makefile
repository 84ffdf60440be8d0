# The two front-door commands. Each creates the virtual environment if it is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: quickstart demo-finetune test test-slow lint bench ui clean-runs

$(BIN)/tmrl: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned: pip takes the build that lies on this machine's disk
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev]'
	touch $(BIN)/tmrl

# Generate demonstrations on OGBench pointmaze-large, pre-train CSP, evaluate zero-shot, track in MLflow.
quickstart: $(BIN)/tmrl
	$(BIN)/tmrl fit --config configs/quickstart.yaml

# The headline: demonstrations -> CSP pre-training (the quickstart) -> TMRL fine-tuning on ladder target (a),
# a pointmaze-large task the pre-trained policy solves about a quarter of the time; ends with the fine-tuned
# policy's success on 20 fixed evaluation episodes (28 CPU-minutes measured; 10-15 minutes alone on 2 cores).
demo-finetune: $(BIN)/tmrl
	set -o pipefail; $(BIN)/tmrl fit --config configs/quickstart.yaml | tee .demo-fit.log
	run=$$(grep -o 'run_id=[0-9a-f]*' .demo-fit.log | tail -1 | cut -d= -f2) && rm -f .demo-fit.log && \
	$(BIN)/tmrl finetune --from-run $$run --config configs/tmrl_pointmaze_a.yaml collect.workers=1

test: $(BIN)/tmrl
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/tmrl
	$(BIN)/python -m pytest -q -m slow

lint: $(BIN)/tmrl
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(BIN)/tmrl
	$(BIN)/tmrl bench

ui: $(BIN)/tmrl
	$(BIN)/tmrl ui
