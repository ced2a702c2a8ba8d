# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch; override e.g. TORCH="torch==2.5.1" or TORCH=torch for a CUDA build.
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs/demo
# The demo's budget: 1,200 steps (2-4 minutes on 2 cores), or DEMO_MINUTES on a slower machine.
# A step budget keeps the result the same on fast and slow machines (digits overfits with more).
DEMO_STEPS ?= 1200
DEMO_MINUTES ?= 6
DEMO_SEED ?= 0

.PHONY: venv demo test lint format clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/flowpp train --config digits --data digits --out $(DEMO_DIR) \
		--max-steps $(DEMO_STEPS) --max-minutes $(DEMO_MINUTES) --eval-every 150 --eval-images 144 \
		--seed $(DEMO_SEED) --no-progress --log-every 50
	$(VENV)/bin/flowpp eval --run $(DEMO_DIR) --data digits --split test --samples 16
	$(VENV)/bin/flowpp sample --run $(DEMO_DIR) -n 64 --scale 4 --out $(DEMO_DIR)/samples.png
	@echo
	@echo "Demo done. In $(DEMO_DIR):"
	@echo "  metrics.csv          learning curve (train / valid bits/dim, lr, img/s, inverse error)"
	@echo "  eval-digits-test-S16.json  test bits/dim (single-sample and importance-weighted)"
	@echo "  samples.png          64 samples; samples/ holds the grids written at each evaluation"
	@echo "  best.pt              the best model (eval, sample, score and export use it)"
	@echo "  checkpoints/         resumable checkpoints;  summary.json  the run's summary"

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n 2 --dist loadgroup

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-demo:
	rm -rf $(DEMO_DIR)
