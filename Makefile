# The two commands: `make demo` (the main job) and `make test` (every test). Both set up what is
# missing first: Debian packages, npm fixtures, the venv, the build.
SHELL := /bin/bash
.DEFAULT_GOAL := test

SYSTEM_PYTHON ?= /usr/bin/python3
VENV ?= .venv
PYTHON := $(CURDIR)/$(VENV)/bin/python
BUILD_DIR ?= build/main
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
export BIASTRANSFER_FIXTURES ?= $(CURDIR)/.cache/fixtures
# The packaging tests reuse this build instead of compiling everything again.
export BIASTRANSFER_BUILD_DIR ?= $(CURDIR)/$(BUILD_DIR)
# The in-tree package: the CMake build installs the compiled files into python/biastransfer.
RUN := PYTHONPATH=$(CURDIR)/python $(PYTHON)

.PHONY: all deps fixtures venv build test test-cpp test-python demo bench format clean fuzz sanitize

# Fuzzing and sanitizers of the torch-free code (fuzz/, docs/security.md): `make fuzz` runs every
# libFuzzer target FUZZ_SECONDS each; `make test` runs them 30 s each in CI (CI=true), 5 s locally.
FUZZ_SECONDS ?= 60
FUZZ_RSS_MB ?= 2048
FUZZ_BUILD_DIR ?= build/fuzz
SANITIZE_BUILD_DIR ?= build/sanitize
TEST_FUZZ_SECONDS := $(if $(filter true,$(CI)),30,5)

all: build

deps:
	@scripts/install-deps.sh

fixtures: deps
	@scripts/fetch-fixtures.sh $(BIASTRANSFER_FIXTURES)

$(PYTHON):
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)

venv: deps $(PYTHON)
	@$(PYTHON) -c "import torch, numpy, pybind11, pytest" || \
	  { echo "venv: $(VENV) cannot import torch/numpy/pybind11/pytest; remove it and rerun"; exit 1; }

build: venv fixtures
	@mkdir -p $(BUILD_DIR)
	@cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DPython3_EXECUTABLE=$(PYTHON) \
	  -DLIBTRANSFER_FIXTURES_DIR=$(BIASTRANSFER_FIXTURES) > $(BUILD_DIR)/configure.log 2>&1 || \
	  { cat $(BUILD_DIR)/configure.log; exit 1; }
	cmake --build $(BUILD_DIR) -j $(JOBS)
	@cmake --install $(BUILD_DIR) --component python --prefix python > /dev/null

test: build
	@status=0; \
	echo "== ctest (Catch2)"; \
	(cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)) > $(BUILD_DIR)/ctest.log 2>&1 || status=1; \
	[ $$status -eq 0 ] || grep -E "\*\*\*|FAILED|^[[:space:]]+[0-9]+ - " $(BUILD_DIR)/ctest.log | head -40; \
	grep -E "tests passed" $(BUILD_DIR)/ctest.log || tail -30 $(BUILD_DIR)/ctest.log; \
	echo "== pytest"; \
	$(RUN) -m pytest -q tests/python || status=1; \
	echo "== sanitize (io tests under ASan+UBSan)"; \
	$(MAKE) --no-print-directory sanitize || status=1; \
	echo "== fuzz ($(TEST_FUZZ_SECONDS) s per target)"; \
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(TEST_FUZZ_SECONDS) || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED"; else echo "make test: all passed"; fi; \
	exit $$status

test-cpp: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

test-python: build
	$(RUN) -m pytest -q tests/python

fuzz: deps
	@FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_RSS_MB=$(FUZZ_RSS_MB) FUZZ_BUILD_DIR=$(FUZZ_BUILD_DIR) \
	  JOBS=$(JOBS) fuzz/run_fuzzers.sh

sanitize: fixtures
	@SANITIZE_BUILD_DIR=$(SANITIZE_BUILD_DIR) JOBS=$(JOBS) fuzz/run_sanitize.sh

demo: build
	$(RUN) -m biastransfer demo

bench: build
	$(RUN) bench/run_all.py

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h')

clean:
	rm -rf build python/biastransfer/_C*.so python/biastransfer/libtransfer.so* \
	  python/biastransfer/_build_info.py
