# The two README commands: `make demo` and `make test`. Both run `make setup` first.
# CPU-only boxes: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` (PyPI's Linux wheel is the CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
TORCH_INDEX ?=
# One stamp per torch version: changing TORCH_VERSION installs again.
STAMP := $(VENV)/.installed-torch-$(TORCH_VERSION)

.PHONY: setup java demo test test-all lint

setup: $(STAMP)

# Checked on every set-up, and before the long install (an order-only prerequisite of the stamp).
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "Java is missing: METEOR 1.5 and the PTB tokenizer need it."; \
	  echo "Install it with: sudo apt-get install -y openjdk-17-jre-headless  (or: conda install -c conda-forge openjdk=17)"; \
	  exit 1; }

$(STAMP): requirements.txt | java
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-torch-*
	@touch $(STAMP)

# One BLAS thread: the summation order, and so the demo's figures, do not depend on the number of cores.
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) main.py --procedure demo

test: setup
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
