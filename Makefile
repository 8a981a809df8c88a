# One command for the demo, one for the tests. Both create .venv with pip if it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.popstack-installed

export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch/torchvision are pinned to the builds pip finds on this machine's disk; elsewhere pip fetches them.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
