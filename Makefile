# make test   - set up .venv (pinned deps, package in editable mode, leap_kernels._C built with its
#               CUDA sources compiled for sm_80/sm_90) and run the test suite
#               (make test BUILD_CUDA=0: the C++ CPU kernels only, for machines without nvcc)
# make demo   - set up .venv and run the demo: baseline vs LEAP distillation on Fashion-MNIST (CPU, minutes)
# make experiment - the seeded comparison last block / one-to-one / LEAP on Fashion-MNIST (CPU, about 35 min;
#               experiments/fashion-mnist/results.md)
# make experiment-fair - the fair comparison: 5 arms x 5 seeds, LEAP's tau and timeout searched on a validation
#               split, pre-registered metrics (CPU, under 75 min; experiments/fashion-mnist-fair/results.md)
# make demo-ops - a short example of the fused-loss ops
# make bench-smoke - the benchmark harness at tiny sizes (CPU ok)
# make bench  - full-size benchmarks (needs a CUDA GPU)
# make lint   - ruff (lint + format check), mypy on leap_kernels/ and the docs check (make test runs it first)
# make gpu-check - the one-call GPU run (tools/gpu_check.sh; OUT=dir for the results; CUDA machine)

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
PKG_STAMP  := $(VENV)/.package-installed
# Any edit under csrc/ rebuilds the extension.
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)
BUILD_CUDA ?= 1
CUDA_ARCHS ?= 8.0;9.0

.PHONY: test lint demo experiment experiment-fair fashion-mnist demo-ops bench bench-smoke gpu-check clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

# Re-runs only when the pins change: a ready .venv never reinstalls torch.
$(DEPS_STAMP): requirements-dev.txt | $(VPY)
	$(VPY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(PKG_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	LEAP_KERNELS_BUILD_CUDA=$(BUILD_CUDA) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" \
	  $(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# LEAP_KERNELS_REQUIRE_EXT: a missing or unusable leap_kernels._C fails the run instead of skipping the cpp tests.
# tools/compile_check.sh: every Triton kernel compiled for sm_90 with Triton 3.8 and 3.6 (no GPU needed).
test: $(PKG_STAMP)
	$(MAKE) --no-print-directory lint
	VENV=$(VENV) bash tools/compile_check.sh
	LEAP_KERNELS_REQUIRE_EXT=1 $(VPY) -m pytest -q tests

# PYTHON_TOOLS: the interpreter that has ruff and mypy (default: the project's venv).
PYTHON_TOOLS ?= $(VPY)
lint:
	$(PYTHON_TOOLS) -m ruff check .
	$(PYTHON_TOOLS) -m ruff format --check .
	$(PYTHON_TOOLS) -m mypy leap_kernels
	$(PYTHON_TOOLS) tools/check_docs.py

gpu-check: $(PKG_STAMP)
	PYTHON=$(VPY) bash tools/gpu_check.sh

# DATA=/path/to/fashion-mnist overrides the Debian package location.
DATA ?=
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

fashion-mnist: $(PKG_STAMP)
	@if [ -z "$(DATA)" ] && [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null || true; \
	  fi; \
	fi
	@if [ -z "$(DATA)" ] && [ ! -f $(FMNIST) ]; then \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or download the four"; \
	  echo "idx files (train/t10k images and labels) into a folder and run 'make demo DATA=that/folder' (or experiment)."; \
	  exit 1; \
	fi

demo: fashion-mnist
	$(VPY) -m leap demo $(if $(DATA),--data $(DATA))

# EXPERIMENT=path/to/config.yaml runs another experiment file; finished runs are reused (leap experiment --fresh retrains).
EXPERIMENT ?= experiments/fashion-mnist/config.yaml
experiment: fashion-mnist
	$(VPY) -m leap experiment $(EXPERIMENT) $(if $(DATA),--data $(DATA))

# The search runs first; finished runs (the search's included) are reused.
experiment-fair: fashion-mnist
	$(VPY) -m leap experiment experiments/fashion-mnist-fair/config.yaml $(if $(DATA),--data $(DATA))

demo-ops: $(PKG_STAMP)
	$(VPY) -m leap_kernels.demo

bench-smoke: $(PKG_STAMP)
	$(VPY) bench/bench_feature_loss.py --smoke

bench: $(PKG_STAMP)
	$(VPY) bench/bench_feature_loss.py

clean:
	rm -rf $(VENV) .venv-triton36 build *.egg-info .pytest_cache .ruff_cache .mypy_cache leap_kernels/_C*.so
