# Two commands on a fresh machine: `make demo` and `make test`. `make test` leaves out the
# tests marked slow (multi-node clusters, job submission, crashes, whole campaigns through
# faults, the browser and Label Studio), about two thirds of the suite's time; `make test-slow`
# runs them, and CI (.ci/run) runs both.
# Each builds .venv if it is missing and installs the project once;
# the stamp file makes a second run install nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed before the project so that a CPU-only machine resolves the local
# CPU wheel and never the CUDA one; on a GPU machine PyPI's 2.13.0 is CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Label Studio for the round-trip test (tests/test_label_studio.py) lives in its own
# virtual environment, never in .venv nor the `test` extra: its many pins never meet ours.
LS_VENV := .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed
LABEL_STUDIO_SPEC ?= label-studio==1.23.2
# Label Studio pins few of its dependencies: a new release of one (sentry-sdk 3.0.0) stopped
# its server from starting. Every package is pinned here, so CI installs what was tested.
LS_CONSTRAINTS := tests/label-studio-constraints.txt

.PHONY: demo test test-slow bench clean fashion-mnist chromium label-studio

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tidal-ray demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

test-slow: $(STAMP) chromium
	$(BIN)/python -m pytest -q -ra -m slow tests

# About 80 s the first time; a second run installs nothing.
label-studio: $(LS_STAMP)

$(LS_STAMP): $(LS_CONSTRAINTS)
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q -c $(LS_CONSTRAINTS) "$(LABEL_STUDIO_SPEC)"
	touch $(LS_STAMP)

# Fashion-MNIST's original idx files under /usr/share/datasets/fashion-mnist (Debian/Ubuntu).
fashion-mnist:
	@if command -v apt-get >/dev/null 2>&1; then \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y dataset-fashion-mnist; \
	else \
		echo "no apt-get here: download the four *-ubyte.gz files of Fashion-MNIST"; \
		echo "(github.com/zalandoresearch/fashion-mnist, data/fashion) into a directory and pass it"; \
		echo "as --data-dir to make-pool, or set TIDAL_RAY_FASHION_MNIST_DIR"; \
		exit 1; \
	fi

# Debian's chromium, for tests/test_report.py (the campaign's page in a headless browser).
# Installed once, where apt-get exists and chromium is missing; if it cannot be installed
# (no apt-get, no root or passwordless sudo, no such package) `make test-slow` goes on and
# the browser tests skip, saying why.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
		{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "could not install chromium (apt-get install chromium): the browser test will skip"; \
	else \
		echo "no apt-get here: the browser test skips unless chromium is on PATH"; \
	fi

clean:
	rm -rf $(VENV) $(LS_VENV)
