# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
# torch==2.13.0 is the quick CPU wheel on our machines; a torch already in .venv is kept.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/tah: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.6"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/tah

.PHONY: demo test lint
demo: $(BIN)/tah
	$(BIN)/tah demo

test: $(BIN)/tah
	$(BIN)/python -m pytest

lint: $(BIN)/tah
	$(BIN)/ruff check src tests benchmarks
