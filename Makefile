# dtl_fast: `make demo` and `make test` set everything up on a fresh machine.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch>=2.11
PYTEST_ARGS ?=
BENCH_ARGS ?=

DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.dtl_fast-built
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cuda/*.cu)

.PHONY: install test demo bench gpu-check info clean

install: $(BUILD_STAMP)

# Third-party packages: once per venv, again only when pyproject.toml changes.
$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" triton numpy ninja pybind11 \
		pytest pytest-benchmark matplotlib scikit-learn
	touch $@

# The package and its C++/CUDA extension: rebuilt when a source of the build changes.
$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/dtl-fast demo
	$(PY) bench/run.py --quick --repeat 3 --device cpu --out out/bench $(BENCH_ARGS)

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

gpu-check:
	bash bench/gpu_check.sh

info: install
	$(VENV)/bin/dtl-fast info

clean:
	rm -rf build dist *.egg-info dtl_fast/_C*.so out .pytest_cache $(BUILD_STAMP)
