# dplatent: two commands do all set-up on a fresh machine.
#   make demo   - venv, install, train the `quick` preset on MNIST at epsilon=10, sample, grid
#   make test   - venv, install, run the test suite
#   make lint   - venv, install, ruff (pycodestyle errors and warnings, pyflakes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo-mnist-eps10
EPSILON ?= 10
DELTA ?= 1e-5

.PHONY: venv demo test lint fid-weights bench clean-venv

$(BIN)/dplatent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build; installing it first keeps pip from pulling a CUDA one.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/dplatent

venv: $(BIN)/dplatent

demo: venv
	@if [ -f $(RUN)/config.json ]; then \
		$(BIN)/dplatent train --resume --out $(RUN); \
	else \
		$(BIN)/dplatent train --dataset mnist --preset quick --epsilon $(EPSILON) \
			--delta $(DELTA) --out $(RUN); \
	fi
	$(BIN)/dplatent sample --run $(RUN) --num 10000 --out $(RUN)/synthetic.npz
	@echo "sample grid: $(RUN)/samples.png   synthetic data: $(RUN)/synthetic.npz"

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks

fid-weights: venv
	$(BIN)/dplatent fetch-fid-weights

bench: venv
	$(BIN)/python benchmarks/run_grid.py

clean-venv:
	rm -rf $(VENV)
