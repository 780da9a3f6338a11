# Two commands do all setup on a fresh machine:
#   make run    builds .venv (CPU torch first, then the project) and starts the node
#   make test   also installs what the tests need (Mosquitto included) and runs the suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test run test system-deps weights train clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first, from the local wheel; the project's range admits it, so
	# nothing below can pull a CUDA build.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	# The Ray Serve encoder pool's tests need the optional extra; the constraints
	# file keeps the CPU torch whatever it depends on.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[ray]'
	touch $@

install-test: $(TEST_STAMP) system-deps

# Mosquitto for the integration tests, espeak-ng for the training corpus' speech,
# prometheus (and its promtool) for the alert rules and the dashboard's queries,
# chromium and its driver for the explorer's browser test.
system-deps:
	@{ command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto; } && \
	  command -v espeak-ng >/dev/null && command -v promtool >/dev/null && \
	  test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq mosquitto espeak-ng prometheus chromium chromium-driver >/dev/null; }

run: install
	$(BIN)/poc-node run

test: install-test
	$(BIN)/ruff check node consensus encoders rewards training tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	# Three test files at a time (pytest-xdist; each file whole, in its own order, on one
	# worker): the integration tests mostly wait on rounds and timeouts, so two cores take
	# about 10 minutes instead of 18.
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

# Untrained, seeded weights (what the first version shipped; tests make their own).
weights: install
	$(BIN)/poc-node init-weights --out var/untrained-weights

# Reproduce the shipped trained weights (needs espeak-ng; on 2 cores about 5 min of
# corpus generation, cached under var/corpus, then about 21 min of training).
train: install system-deps
	$(BIN)/poc-node train --out weights/default

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
