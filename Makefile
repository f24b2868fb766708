# Two entry points from a fresh clone: `make chat` and `make test`. Both set everything up first.
# `make lint` runs ruff and mypy.
# `make test-devices` builds a second environment with ggml's RPC backend and runs the device tests.
# `make test-openwebui` installs Open WebUI and Chromium and drives Open WebUI against `lva serve` in a browser.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEVICES_VENV ?= .venv-rpc
DEVICES_BIN := $(DEVICES_VENV)/bin
LLAMA_CPP_PYTHON := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
OPENWEBUI_VENV ?= .venv-openwebui
OPENWEBUI_BIN := $(OPENWEBUI_VENV)/bin
OPENWEBUI := open-webui==0.12.4
CPU_TORCH := torch==2.13.0+cpu

.PHONY: chat test lint test-devices test-openwebui install bench clean kernels-werror

KERNEL_SOURCES := $(wildcard models/kernels/*.c models/kernels/*.h)

$(BIN)/.installed: pyproject.toml setup.py $(KERNEL_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	touch $@

install: $(BIN)/.installed

chat: install
	$(BIN)/lva

test: install
	$(BIN)/python -m pytest

# ruff (its rules and why: pyproject.toml) and mypy over assistant/ convert/ models/; CI wants zero findings.
# Tests and benchmarks get pyflakes' checks (undefined and unused names, syntax) only.
lint: install
	$(BIN)/ruff check assistant convert models
	$(BIN)/ruff check tests bench --select F,E9
	$(BIN)/mypy

# llama-cpp-python built from source with the RPC backend (about 5 minutes on 2 cores), never from pip's
# cache (it holds the CPU build) and never into it.
$(DEVICES_BIN)/.installed: pyproject.toml setup.py $(KERNEL_SOURCES)
	$(PYTHON) -m venv $(DEVICES_VENV)
	$(DEVICES_BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_RPC=on" $(DEVICES_BIN)/python -m pip install --quiet --no-cache-dir \
		--no-binary llama-cpp-python '$(LLAMA_CPP_PYTHON)'
	$(DEVICES_BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The runtime on a device whose memory is not host memory: ggml RPC servers started by the tests.
test-devices: $(DEVICES_BIN)/.installed
	@tests/devices/vulkan_status.sh
	$(DEVICES_BIN)/python -m pytest --devices tests/devices

# The kernels once more with every warning an error (installs build them with the warnings on, not fatal).
kernels-werror:
	$(CC) -O3 -std=c11 -Wall -Wextra -Wshadow -Wmissing-prototypes -Werror -fPIC -shared \
		-o /dev/null $(filter %.c,$(KERNEL_SOURCES))

# Open WebUI from PyPI in its own environment. Its dependencies want torch: a CPU build goes in first (the +cpu
# wheel, never PyPI's CUDA one, which is gigabytes), and the check after open-webui says if anything replaced it.
$(OPENWEBUI_BIN)/.installed:
	$(PYTHON) -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_BIN)/python -m pip install --quiet --upgrade pip
	$(OPENWEBUI_BIN)/python -m pip install --quiet '$(CPU_TORCH)'
	$(OPENWEBUI_BIN)/python -m pip install --quiet '$(OPENWEBUI)'
	$(OPENWEBUI_BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda and f'torch {torch.__version__} is a CUDA build')"
	touch $@

# Open WebUI in headless Chromium (Debian's chromium and chromium-driver) against `lva serve`: tests/openwebui.
test-openwebui: install $(OPENWEBUI_BIN)/.installed
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }
	$(BIN)/python -m pip install --quiet -e '.[test,openwebui]'
	$(BIN)/python -m pytest --openwebui $(OPENWEBUI_BIN)/open-webui tests/openwebui

bench: install
	$(BIN)/python bench/convert_bench.py
	$(BIN)/python bench/runtime_bench.py --work /tmp/lva-bench --reuse --write-docs
	$(BIN)/python bench/chat_bench.py --work /tmp/lva-bench --reuse --write-docs
	$(BIN)/python bench/server_bench.py --write-docs

clean:
	rm -rf $(VENV) $(DEVICES_VENV) $(OPENWEBUI_VENV) build *.egg-info .pytest_cache models/kernels/*.so
