# make test   - set up .venv (pinned deps, package in editable mode) and run the test suite
# make demo   - set up .venv and run the demo
# make bench-smoke - the benchmark harness at tiny sizes (CPU ok)
# make bench  - full-size benchmarks (needs a CUDA GPU)

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
PKG_STAMP  := $(VENV)/.package-installed

.PHONY: test demo bench bench-smoke clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

# Re-runs only when the pins change: a ready .venv never reinstalls torch.
$(DEPS_STAMP): requirements-dev.txt | $(VPY)
	$(VPY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(PKG_STAMP): $(DEPS_STAMP) setup.py pyproject.toml
	$(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

test: $(PKG_STAMP)
	$(VPY) -m pytest -q tests

demo: $(PKG_STAMP)
	$(VPY) -m leap_kernels.demo

bench-smoke: $(PKG_STAMP)
	$(VPY) bench/bench_feature_loss.py --smoke

bench: $(PKG_STAMP)
	$(VPY) bench/bench_feature_loss.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
