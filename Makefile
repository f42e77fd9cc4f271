# The README's commands. `make test` and `make bench` set up everything they need on a
# fresh machine: a venv with torch, the build (with the CUDA kernels when nvcc and a
# CUDA build of torch are there), then the tests or the benchmark.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
# timm (for the conversion tests) needs torchvision: the release that pairs with TORCH.
TORCHVISION ?= torchvision==0.29.1

# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= $(shell nproc)

.PHONY: venv build test bench example sass lint format clean

venv: $(VENV)/.ready

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm  # for tools/sass_report.py (make sass, CI)
	$(PY) -m pip install -q "$(TORCH)" "$(TORCHVISION)" ninja pybind11 pytest pytest-xdist numpy expecttest \
		setuptools wheel matplotlib timm scikit-learn onnx onnxscript onnxruntime ultralytics
	touch $@

# --no-build-isolation: build against the torch in the venv (torch is not a build
# requirement; see pyproject.toml). Rebuilt only when a source changes.
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

build: $(VENV)/.built

$(VENV)/.built: $(VENV)/.ready $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# -n auto: one pytest worker per core (Triton's interpreter makes the CPU run long).
test: build
	$(PY) -m pytest -q -n auto tests

# The default sweep for this machine (a short CPU sweep without a GPU, the full sweep
# with one), its CSV under benchmarks/results/ and the plots beside it.
bench: build
	$(PY) benchmarks/bench.py --plot

# The machine code of the CUDA kernels (no GPU needed): the report, and the check CI runs.
sass: build
	$(PY) tools/sass_report.py --check --markdown benchmarks/results/sass-sm90/report.md

# The training example: fused and eager activations side by side on sklearn's digits.
example: build
	$(PY) examples/train_digits.py

# Linters (config: pyproject.toml's [tool.ruff], .clang-format); CI runs `make lint`.
LINT_TOOLS := ruff==0.17.6 clang-format==23.1.5
CSRC := $(shell find csrc tests/cpp -name '*.h' -o -name '*.cpp' -o -name '*.cu')

$(VENV)/.lint: $(VENV)/.ready
	$(PY) -m pip install -q $(LINT_TOOLS)
	touch $@

lint: $(VENV)/.lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

format: $(VENV)/.lint
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CSRC)

clean:
	rm -rf build fusedact/_C*.so fusedact/_build_config.py *.egg-info $(VENV)/.built
