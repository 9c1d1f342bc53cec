# Standalone set-up in a project venv. On a machine without torch it installs the CPU build
# torch==2.13.0; never an unpinned torch (that would pull a multi-GB CUDA build).
# Use another build with:  make TORCH_SPEC="torch==2.14.1" ...   or an existing venv: make VENV=...
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.seqlora-installed

.PHONY: setup demo test bench ui clean toy-base gpu-wheels

setup: $(STAMP)

$(STAMP): requirements.txt requirements-standalone.txt requirements-ui.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -r requirements.txt -r requirements-standalone.txt -r requirements-ui.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

demo: setup
	$(PY) -m seqlora_core demo --out out/demo

test: setup
	$(PY) -m pytest -q

ui: setup
	$(PY) -m seqlora_ui --base toy

# Rebuild the shipped toy base (seqlora_core/hosts/weights/toy.*) from its seed: about 100 min on 2 cores (three phases)
toy-base: setup
	$(PY) -m seqlora_core.toy.pretrain

# Wheels a lent GPU machine lacks (no network there; it has torch, transformers, safetensors,
# scikit-image): carried with the device call as .cache/gpu-wheels; bench/gpu_check.sh installs them
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps -d .cache/gpu-wheels "diffusers==$$($(PY) -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata

bench: setup
	$(PY) bench/step_cost.py

clean:
	rm -rf out .cache .pytest_cache
