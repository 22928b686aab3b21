# Two entry points, each doing its own set-up in .venv on first use:
#   make demo   invert + edit the bundled samples with the shipped toy model -> outputs/
#   make test   the test suite (installs the CPU torch oracle first)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q torch==2.13.0   # the CPU wheel; install before anything that pulls torch
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.base
	$(PY) scripts/invert.py

# Two workers, one per core, each test file whole on one of them (its module fixtures built once).
test: $(VENV)/.test
	$(PY) -m pytest -n 2 --dist loadfile tests
