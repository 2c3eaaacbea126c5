# noisealign developer commands. `make demo` and `make test` create the environment first
# when it is missing, so each works alone on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU wheel of torch: pinned because that build lies on disk on our CPU machines; GPU
# machines get whatever torch is already installed or the default CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-fast quality style demo collect-tiny clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q "$(TORCH_CPU)" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

quality: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

style: setup
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

# The main job on the embedded default (the toy world, CPU). Until the full chain lands
# this is the tiny toy-world collect (recipes/tiny/collect.yaml).
demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --cpu --num_processes 1 --mixed_precision no --dynamo_backend no \
	  src/noisealign/collect.py --config recipes/tiny/collect.yaml

clean:
	rm -rf $(VENV) outputs .pytest_cache
