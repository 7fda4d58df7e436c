# `make demo` runs the main job, `make test` the tests, `make bench` the benchmark (about an hour;
# it trains the generic CIFAR-10 model first if ~/.cache/ee has none); all create .venv and install ee first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench clean

GENERIC := $(HOME)/.cache/ee/models/cifar_resnet9.h5
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

$(GENERIC): | install
	PYTHONPATH=. $(BIN)/python -m models.train_cifar

bench: install $(GENERIC)
	PYTHONPATH=. $(BIN)/python -m bench.run --generic $(GENERIC) $(BENCH_ARGS)

clean:
	rm -rf build bundles runs .pytest_cache
