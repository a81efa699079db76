# dtl_fast: `make demo` and `make test` set everything up on a fresh machine.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch>=2.11
PYTEST_ARGS ?=
BENCH_ARGS ?=
# `make demo`: DTL and both baselines on the bundled digits data, three seeds (each with its own
# demo data split), the mean +- std table and the paired DTL - best baseline interval; sized to
# finish (setup included) in under 10 minutes on a 2-core CPU machine; `dtl-fast train --help`
# for the rest.
DEMO_ARGS  ?= --seeds 3 --epochs 7 --batch-size 32 --image-size 16 --max-frames 8 --width 16 \
              --hidden-size 32 --dim 32 --num-heads 2 --num-layers 1

DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.dtl_fast-built
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cuda/*.cu)

.PHONY: install test test-cpu-capabilities test-min-versions wheel-check demo bench gpu-check aot-gpu-triton info clean

install: $(BUILD_STAMP)

# Third-party packages: once per venv, again only when pyproject.toml changes.
$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" triton numpy ninja pybind11 \
		pytest pytest-benchmark matplotlib scikit-learn pillow torchvision av tqdm
	# Triton before 3.7 (torch 2.11's) has an interpreter that NumPy 2.4 breaks (the CPU tests
	# run the Triton kernels in it; dtl_fast._triton.interpreter_conflict): keep NumPy below 2.4
	$(PY) -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) < (3, 7))" \
		|| $(PY) -m pip install --quiet "numpy<2.4"
	touch $@

# The package and its C++/CUDA extension: rebuilt when a source of the build changes.
$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The bfloat16 / float16 / autocast tests (marker `half`) once more under each other CPU
# capability this machine has (ATEN_CPU_CAPABILITY=default, avx2, avx512): ATen's CPU kernels
# round differently under each, and a user's machine may pick any of them. CI runs it.
test-cpu-capabilities: install
	$(PY) .ci/cpu_capabilities.py $(PYTEST_ARGS)

# The oldest torch the package accepts (pyproject: torch>=2.11) and the Triton it pins (3.6):
# what the GPU machines run. Dynamo, torch.library and Triton's interpreter behave differently there (s29 found a
# dynamo folding that undid a fix, a tl.dot default and a NumPy clash that only these versions
# show). A venv of its own, the tree copied beside it (an editable build in this tree would
# replace the .so the main venv's torch needs), the extension built against those headers (CUDA
# kernels too where nvcc is), then the version-sensitive tests: torch.compile / export /
# torch.library / torch.func around every op, and the Triton kernels in the interpreter. CI
# runs it. torch 2.11 wants setuptools < 82; NumPy < 2.4 for Triton 3.6's interpreter.
MIN_TORCH  ?= 2.11.0
MIN_TRITON ?= 3.6.0
MIN_VENV   ?= .venv-min
MIN_PY     := $(abspath $(MIN_VENV))/bin/python
MIN_TREE   := $(MIN_VENV)/tree
# ~5 min on 2 cores; not the AOT compile tests (make aot-gpu-triton: known 3.6 spills), the
# training / memory / bench runs or the data tests (plain torch, no compiler in between)
MIN_TESTS  ?= tests/test_rnn_ops.py tests/test_rnn_persistent.py tests/test_rnn_modules.py \
              tests/test_frame_pool.py tests/test_ops_eager.py tests/test_integer_arguments.py \
              tests/test_cosine_attention.py tests/test_cosine_attention_fwd.py \
              tests/test_cosine_attention_bwd.py tests/test_cosine_attention_per_head.py \
              tests/test_cosine_attention_tma.py tests/test_attention_modules.py \
              tests/test_triton_launch.py tests/test_models.py tests/test_models_capture.py
MIN_STAMP  := $(MIN_VENV)/.deps-installed

$(MIN_STAMP): pyproject.toml
	test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install --quiet "torch==$(MIN_TORCH)" "triton==$(MIN_TRITON)" "numpy<2.4" \
		"setuptools<82" wheel ninja pybind11 pytest pytest-benchmark tqdm
	touch $@

test-min-versions: $(MIN_STAMP)
	rm -rf $(MIN_TREE) && mkdir -p $(MIN_TREE)
	git ls-files -co --exclude-standard -z -- . ':!$(MIN_VENV)' > $(MIN_VENV)/tree.files
	tar --null --ignore-failed-read -T $(MIN_VENV)/tree.files -cf $(MIN_VENV)/tree.tar
	tar -xf $(MIN_VENV)/tree.tar -C $(MIN_TREE) && rm $(MIN_VENV)/tree.tar $(MIN_VENV)/tree.files
	cd $(MIN_TREE) && $(MIN_PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	cd $(MIN_TREE) && $(MIN_PY) -c "import torch, triton; assert torch.__version__.startswith('$(MIN_TORCH)'), torch.__version__; assert triton.__version__ == '$(MIN_TRITON)', triton.__version__"
	cd $(MIN_TREE) && $(MIN_PY) -m pytest -q -p no:cacheprovider $(MIN_TESTS) $(PYTEST_ARGS)

# The user's install: build the wheel, install it (not editable) into a fresh venv outside the
# source tree, run `dtl-fast info`, data demo, a two-step train and evaluate from there. CI runs it.
wheel-check: install
	PYTHON=$(abspath $(PY)) bash .ci/wheel_check.sh

demo: install
	$(VENV)/bin/dtl-fast train --out out/demo $(DEMO_ARGS)

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

gpu-check:
	bash bench/gpu_check.sh

# The ahead-of-time compile tests (every launch configuration for sm_80 / sm_90: registers,
# spills, shared memory, MMA in the SASS) once more under the Triton of the GPU machines
# (TRITON_GPU, 3.6 today), installed beside the venv's own: a kernel that compiles cleanly
# under the newer Triton here may not under that one. Not part of `make test` (~15 min, and it
# needs that Triton wheel from an index).
TRITON_GPU ?= 3.6.0
TRITON_GPU_DIR := $(VENV)/triton-$(TRITON_GPU)
aot-gpu-triton: install
	test -d $(TRITON_GPU_DIR) || $(PY) -m pip install --quiet --no-deps --target $(TRITON_GPU_DIR) "triton==$(TRITON_GPU)"
	PYTHONPATH=$(abspath $(TRITON_GPU_DIR)) $(PY) -c "import triton; assert triton.__version__ == '$(TRITON_GPU)', triton.__version__"
	PYTHONPATH=$(abspath $(TRITON_GPU_DIR)) $(PY) -m pytest -q -p no:cacheprovider -m slow \
		tests/test_rnn_compile.py tests/test_cosine_attention_compile.py $(PYTEST_ARGS)

info: install
	$(VENV)/bin/dtl-fast info

clean:
	rm -rf build dist *.egg-info dtl_fast/_C*.so out .pytest_cache $(BUILD_STAMP)
