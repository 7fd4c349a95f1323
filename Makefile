# The project's own install: CI and new machines start bare.
PY ?= python3
PIP ?= $(PY) -m pip
# torch 2.13.0 is the CPU build served from local disk on the project's machines. On a GPU machine keep its
# CUDA torch: `make demo TORCH=` installs nothing for torch.
TORCH ?= torch==2.13.0

.PHONY: install install-dev demo test lint
install:
	$(PIP) install -q $(TORCH) "setuptools>=64" -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .

install-dev: install
	$(PIP) install -q $(TORCH) -r requirements-dev.txt

demo: install
	$(PY) examples/qwen/demo.py

test: install-dev
	$(PY) -m ruff check .
	hadolint Dockerfile
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
	hadolint Dockerfile
