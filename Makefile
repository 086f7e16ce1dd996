# advalign_jax: `make demo` runs the main job on the embedded data; `make test` runs the test suite.
# Both create the virtual environment .venv (Python 3.11+) and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed tests/requirements-reference.txt
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -r tests/requirements-reference.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/advalign-jax evaluate --config configs/adversarial_alignment.py

test: $(VENV)/.installed-test
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n auto tests

clean:
	rm -rf $(VENV) results .pytest_cache
