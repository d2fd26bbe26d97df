# Two commands on a fresh machine: `make demo` and `make test`.
# Each builds .venv if it is missing and installs the project once;
# the stamp file makes a second run install nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed before the project so that a CPU-only machine resolves the local
# CPU wheel and never the CUDA one; on a GPU machine PyPI's 2.13.0 is CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tidal-ray demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV)
