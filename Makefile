# The two README commands: `make demo` and `make test`. Both run `make setup` first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

setup: $(STAMP)
	@command -v java >/dev/null 2>&1 || { \
	  echo "Java is missing: METEOR 1.5 and the PTB tokenizer need it."; \
	  echo "Install it with: sudo apt-get install -y openjdk-17-jre-headless  (or: conda install -c conda-forge openjdk=17)"; \
	  exit 1; }

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

demo: setup
	$(PY) main.py --procedure demo

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
