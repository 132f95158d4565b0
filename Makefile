# The README's two commands. Each creates/updates .venv and installs what it needs.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlx-installed

.PHONY: demo test lint install

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Compile and run the real Gemma 3 270M (from the PyPI GGUF package) on the built-in default prompt.
demo: $(STAMP)
	$(BIN)/python -m rlx.demo

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	duplicates rlx tests || true
