# texture-pipeline: `make repro` runs the whole pipeline, `make test` runs the tests.
# Both create .venv when missing and install torch==2.13.0 (CPU) before the project.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# DVC stages call `python`, `torchrun` and `mlflow`: the venv's bin/ comes first.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install repro test test-fast lint format bench gpu-check ui clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,team]'
	touch $@

install: $(VENV)/.installed

repro: install  ## run the whole pipeline (dvc repro) on params.yaml
	dvc repro

test: install  ## the whole test suite (unit + integration: torchrun, mlflow server, dvc repro)
	$(PY) -m pytest -q

test-fast: install  ## unit tests only
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check pipeline stages tests benchmarks
	$(VENV)/bin/ruff format --check pipeline stages tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix pipeline stages tests benchmarks
	$(VENV)/bin/ruff format pipeline stages tests benchmarks

bench: install  ## every benchmark, side-by-side ratios -> benchmarks/results.{md,json} (shown in README)
	$(PY) benchmarks/report.py

# No install step: GPU machines may have no network. PY=... picks the Python, ARGS="--out benchmarks/gpu_check.md".
gpu-check:  ## ~5 min on NVIDIA GPUs: NCCL busbw, steps/s 1 vs all GPUs, compile, data_wait png/raw, memory
	PY=$(if $(wildcard $(PY)),$(PY),python) bash benchmarks/gpu_check.sh $(ARGS)

ui: install  ## MLflow UI on the embedded store
	mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

clean:
	rm -rf data models checkpoints plots registry mlflow.db mlartifacts
