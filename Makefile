# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch (never the 5.8 GB CUDA build on CPU machines).  Elsewhere, e.g.:
#   make TORCH=torch PIP_EXTRA="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
TORCH  ?= torch==2.13.0+cpu
PIP_EXTRA ?=
EXTRAS ?= test
WEIGHTS ?= $(if $(NSFW_DASK_MODEL_DIR),$(NSFW_DASK_MODEL_DIR),$(abspath ../shared/weights))
REFERENCE ?= $(if $(NSFW_DASK_REFERENCE_DIR),$(NSFW_DASK_REFERENCE_DIR),$(abspath ../shared/reference))
BIN := $(VENV)/bin

.PHONY: setup test lint test-all demo bench bench-quick bench-job gpu-api-check gpu-kit clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_EXTRA) "$(TORCH)"
	$(BIN)/python -m pip install -q $(PIP_EXTRA) -e ".[$(EXTRAS)]"
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA build' if torch.version.cuda else 'CPU build')"
	touch $@

## the tests: lint and format (ruff), types (mypy), then pytest (weight-dependent ones read LAION's weights from $(WEIGHTS))
test: setup lint
	NSFW_DASK_MODEL_DIR="$(WEIGHTS)" $(BIN)/python -m pytest

## the parity and determinism modules again under another CPU's BLAS kernels: MKL limited to AVX2 on
## an AVX-512 machine, to SSE4.2 on an AVX2 one (a stored or assumed last bit shows up here first);
## the in-process tests only: processes and schedulers do not change kernels (the main run has them)
MKL_OTHER ?= $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo AVX2 || echo SSE4_2)
test-kernels: setup
	@echo "parity and determinism with MKL_ENABLE_INSTRUCTIONS=$(MKL_OTHER)"
	MKL_ENABLE_INSTRUCTIONS=$(MKL_OTHER) NSFW_DASK_MODEL_DIR="$(WEIGHTS)" $(BIN)/python -m pytest -q \
		tests/test_contract.py tests/test_determinism.py \
		-k "not subprocess and not localcluster and not threaded_scheduler and not concurrent_threads"

## ruff (lint, import order, format) and mypy, as configured in pyproject.toml
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## the main job: generate a sample dataset, score it on a local Dask cluster, summary + histogram
demo: setup
	NSFW_DASK_MODEL_DIR="$(WEIGHTS)" $(BIN)/nsfw-dask demo

bench: setup
	NSFW_DASK_MODEL_DIR="$(WEIGHTS)" $(BIN)/python benchmarks/bench_scoring.py --out results

bench-quick: setup
	NSFW_DASK_MODEL_DIR="$(WEIGHTS)" $(BIN)/python benchmarks/bench_scoring.py --quick --out results

## the main job as users run it (whole `nsfw-dask score` processes vs a plain script, read-only floor, memory)
bench-job: setup
	NSFW_DASK_MODEL_DIR="$(WEIGHTS)" $(BIN)/python benchmarks/bench_job.py --out results

## checks the installed cuDF/CuPy/dask-cuda API on CPU (installs the ~5 GB GPU extra into .venv-gpu).
## The venv is made anew each time and resolved as a user's `pip install "nsfw-dask[gpu-cu13]"` is
## (a current pip, nothing pinned beyond pyproject.toml), so a release that breaks `import cudf` shows
## up here; check-resolution resolves the same for Python 3.12 (the GPU machines'; numpy 2.5 needs it).
GPU_EXTRA ?= gpu-cu13
gpu-api-check:
	rm -rf .venv-gpu
	$(PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q -U pip
	.venv-gpu/bin/python -m pip install -q $(PIP_EXTRA) "$(TORCH)"
	.venv-gpu/bin/python -m pip install -q -e ".[test,$(GPU_EXTRA)]"
	.venv-gpu/bin/python -c "import numpy, cudf, dask_cudf, dask_cuda; print('fresh install imports cudf', cudf.__version__, 'with numpy', numpy.__version__)"
	.venv-gpu/bin/python benchmarks/gpu_kit/kit.py check-resolution --extra $(GPU_EXTRA) --python-version 3.12 --show-unbounded
	.venv-gpu/bin/python -m pytest -p no:cacheprovider -m gpu_api tests/test_gpu_api.py -v

## everything a GPU machine without network needs for benchmarks/bench_gpu.py: the pinned wheels
## (benchmarks/gpu_kit/wheels.txt, downloaded once), the weights and reference files, cut into
## pieces of <= 60 MiB in gpu-kit/01, gpu-kit/02, ... (git-ignored); see benchmarks/gpu_kit/README.md
gpu-kit:
	$(PYTHON) benchmarks/gpu_kit/kit.py build --out gpu-kit \
		--weights "$(WEIGHTS)" --reference "$(REFERENCE)"

clean:
	rm -rf $(VENV) .venv-gpu results gpu-kit *.egg-info
