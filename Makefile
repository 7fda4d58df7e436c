# `make demo` runs the main job, `make test` the tests; both create .venv and install ee first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/pytest -q

demo: install
	bash scripts/demo.sh

clean:
	rm -rf build bundles runs .pytest_cache
