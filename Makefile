# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch (override TORCH_SPEC for a CUDA build, e.g.
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"), the dependencies
# and the package with its compiled extension, then run.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
# Rebuild the extension whenever a C++ source or the build files change.
EXT_DEPS   := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
PYTEST_ARGS ?=

.PHONY: setup demo test bench bench-gpu env clean

setup: $(VENV)/.installed

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=69" wheel ninja
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(EXT_DEPS)
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(PY) -m dancegrpo.demo

test: setup
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m pytest bench --benchmark-only -q

env: setup
	$(PY) -m dancegrpo.env

clean:
	rm -rf $(VENV) build *.egg-info dancegrpo/_C*.so
