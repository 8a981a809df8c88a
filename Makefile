# One command for the demo, one for the tests. Both create .venv with pip if it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.popstack-installed

export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast lint install clean wheel-check

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The whole suite (minutes); test-fast skips the tests marked slow (whole-pipeline and multi-process runs).
test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# The packaged commands work from any directory: build the wheel, install it (no deps: they come from $(VENV)
# through a .pth file) into a fresh venv, check that it installs only `popstack`, and run `popstack-train debug=fast` + `popstack-predict` outside the repo.
WHEEL_DIR  := build/wheel-check
WHEEL_VENV := $(WHEEL_DIR)/venv
wheel-check: $(STAMP)
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)/work
	$(PY) -m pip wheel --no-deps --no-build-isolation -q -w $(WHEEL_DIR)/dist .
	$(PY) -m venv --without-pip $(WHEEL_VENV)
	$(PY) -m pip --python $(WHEEL_VENV)/bin/python install -q --no-deps $(WHEEL_DIR)/dist/*.whl
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(WHEEL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/project-deps.pth"
	cd $(WHEEL_DIR)/work && ../venv/bin/python $(CURDIR)/tests/wheel_contents.py
	cd $(WHEEL_DIR)/work && ../venv/bin/popstack-train debug=fast hydra.run.dir=run stacking.members.tabnet.enabled=false
	cd $(WHEEL_DIR)/work && ../venv/bin/popstack-predict run data/synthetic-120-40-s0-w0 --out preds.csv --no-progress

clean:
	rm -rf outputs .pytest_cache build
