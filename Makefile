# The README's two commands: `make train` (the main job) and `make test` (the test suite).
# Each creates .venv with the pinned dependencies when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test lint bench gpu-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pin the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: 4 CPU processes (PP=2 with DualPipe x DP=2 with ZeRO-1 x EP=2, on two simulated nodes);
# hai-launch prints the torchrun command it runs.
train: $(STAMP)
	$(VENV)/bin/hai-launch --dp 2 experiment=tiny_parallel

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.model_step

# The GPU smoke kit (tests/gpu: FP8 backends, training on one GPU, host syncs counted by CUDA, peak memory, one
# rank on NCCL) on one GPU; writes bench/results/gpu_smoke.json. On a GPU machine the .venv's pinned torch is
# PyPI's CUDA build; SMOKE_PY=python3 uses an interpreter that already holds the dependencies instead.
SMOKE_PY ?=
gpu-smoke:
	$(if $(SMOKE_PY),,$(MAKE) $(STAMP))
	$(or $(SMOKE_PY),$(PY)) -m pytest -q -rs -m gpu tests/gpu

clean:
	rm -rf $(VENV) .pytest_cache
