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

.PHONY: setup demo test bench bench-gpu env clean base-models

setup: $(VENV)/.installed

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=70.1" ninja
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

# The shipped shapes base models, as they were made: about 4 hours on 2 CPU cores (the same
# weights bit for bit only on the same CPU and torch build). Writes $(SHAPES_OUT); copy a
# model folder to src/dancegrpo/assets/shapes_<task>/ to ship it. Video models start from image
# weights (inflated), image-to-video from text-to-video: see dancegrpo/worlds/shapes/pretrain.py.
SHAPES_OUT ?= build/shapes
PRETRAIN   := $(PY) -m dancegrpo.worlds.shapes.pretrain --label-noise 0.25 --threads 1
base-models: setup
	$(PRETRAIN) --task t2i --steps 4500 --batch 32 --seed 0 --eval-n 128 --out $(SHAPES_OUT)/t2i_stage1
	$(PRETRAIN) --task t2i --steps 24000 --batch 32 --seed 1 --init $(SHAPES_OUT)/t2i_stage1 --snapshots 10000 --out $(SHAPES_OUT)/t2i
	$(PRETRAIN) --task t2v --steps 6000 --batch 16 --lr 5e-4 --seed 2 --init-image $(SHAPES_OUT)/t2i/step_10000 --snapshots 2500 --out $(SHAPES_OUT)/t2v
	$(PRETRAIN) --task i2v --steps 4000 --batch 16 --lr 5e-4 --seed 3 --init-t2v $(SHAPES_OUT)/t2v/step_2500 --out $(SHAPES_OUT)/i2v

clean:
	rm -rf $(VENV) build *.egg-info src/dancegrpo/_C*.so
