# Two entry points, each doing its own set-up on first use:
#   make demo   invert + edit the bundled samples with the shipped toy model -> outputs/
#   make test   the test suite (installs the CPU torch oracle and, if missing, Chromium first)
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

# tests/test_report.py opens the HTML report in a headless Chromium: $NTI_CHROMIUM, else
# `chromium` on PATH or /usr/bin/chromium. Missing, it is installed with apt-get (Debian's
# package; sudo when not root); with no apt-get, make stops here with what to do.
CHROMIUM_HELP := make test needs a headless Chromium for tests/test_report.py: install Debian's package (apt-get install -y chromium) or set NTI_CHROMIUM=/path/to/chromium, then run make test again
$(VENV)/.chromium: | $(VENV)/.base
	@if [ -n "$$NTI_CHROMIUM" ] && [ -x "$$NTI_CHROMIUM" ] || command -v chromium >/dev/null || [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null && { [ "$$(id -u)" -eq 0 ] || command -v sudo >/dev/null; }; then \
	    S=$$([ "$$(id -u)" -eq 0 ] || echo sudo); echo "installing Chromium for tests/test_report.py: $${S:+$$S }apt-get install -y chromium"; \
	    $$S apt-get update -q && $$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || { echo "$(CHROMIUM_HELP)" >&2; exit 1; }; \
	else echo "$(CHROMIUM_HELP)" >&2; exit 1; fi
	touch $@

.PHONY: demo test
demo: $(VENV)/.base
	$(PY) scripts/invert.py

# Two workers, one per core, each test file whole on one of them (its module fixtures built once).
test: $(VENV)/.test $(VENV)/.chromium
	$(PY) -m pytest -n 2 --dist loadfile tests
