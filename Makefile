# Two entry points from a fresh clone: `make chat` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: chat test install bench clean

$(BIN)/.installed: pyproject.toml setup.py models/kernels/attention.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

chat: install
	$(BIN)/lva

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/convert_bench.py
	$(BIN)/python bench/runtime_bench.py --work /tmp/lva-bench --reuse --write-docs
	$(BIN)/python bench/chat_bench.py --work /tmp/lva-bench --reuse --write-docs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
