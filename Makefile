# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
# torch==2.13.0 is the quick CPU wheel on our machines; a torch already in .venv is kept.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/tah: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.9"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/tah

# The lower bounds: a second venv with pyproject.toml's oldest transformers, accelerate, datasets,
# safetensors, rich and tqdm (each `>=X` there installed as `==X`), for the tests that lean on them.
LOWER := .venv-lower
LOWER_BIN := $(LOWER)/bin
LOWER_PINS = $(shell sed -n 's/^ *"\(transformers\|accelerate\|datasets\|safetensors\|rich\|tqdm\)>=\([^"]*\)",*$$/\1==\2/p' pyproject.toml)
# The tests that lean on them most: parity, generation, training (accelerate), data and labels (datasets),
# checkpoints (safetensors), FLOP counts (transformers' modules), ~1 min more than the parity ones alone.
LOWER_TESTS := tests/test_parity_upstream.py tests/test_generation.py tests/test_training.py tests/test_train.py \
	tests/test_hf_compat.py tests/test_checkpoint.py tests/test_data.py tests/test_label.py tests/test_flops.py \
	tests/test_toy_task.py

$(LOWER_BIN)/tah: pyproject.toml
	test -x $(LOWER_BIN)/python || $(PY) -m venv $(LOWER)
	$(LOWER_BIN)/python -c "import torch" 2>/dev/null || $(LOWER_BIN)/pip install -q "torch==2.13.0" || $(LOWER_BIN)/pip install -q "torch>=2.9"
	$(LOWER_BIN)/pip install -q -e ".[test]" $(LOWER_PINS)
	touch $(LOWER_BIN)/tah

.PHONY: demo test test-lower lint
demo: $(BIN)/tah
	$(BIN)/tah demo

test: $(BIN)/tah
	$(BIN)/python -m pytest

test-lower: $(LOWER_BIN)/tah
	$(LOWER_BIN)/python -c "import transformers; print('transformers', transformers.__version__)"
	$(LOWER_BIN)/python -m pytest $(LOWER_TESTS)

lint: $(BIN)/tah
	$(BIN)/ruff check src tests benchmarks
