# compaware's everyday commands. `make help` lists them.
PYTHON ?= python

.PHONY: help install train test test-slow lint compare bench bench-overhead clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## install compaware (editable) with its test tools into the active Python
	$(PYTHON) -m pip install -e ".[test]"

train:  ## one default run: LeNet-5, low-rank regularizer, SVD, on the embedded digits
	compaware train

# One OpenMP thread per test process unless set: the tests' models are tiny, several test
# processes run at once, and threads that spin-wait for each other on a busy 2-core machine
# turn a millisecond SVD into seconds.
test:  ## the test suite (a few minutes on 2 CPU cores)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest

test-slow:  ## the slow cases: every model × method, the experiments' real runs, SLURM sweeps
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest -m "slow and not survey"

compare:  ## every method vs the post-hoc baselines on Fashion-MNIST → docs/results.md (~80 min)
	scripts/compare_fashion.sh

bench:  ## MAC savings vs measured CPU speed-ups, per model × compression (docs/performance.md)
	$(PYTHON) scripts/bench_speedup.py

bench-overhead:  ## training-step cost of each regularizer, and of compaware's loop
	$(PYTHON) scripts/bench_overhead.py

lint:  ## static checks
	$(PYTHON) -m ruff check compaware tests

clean:  ## remove run outputs and caches
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
