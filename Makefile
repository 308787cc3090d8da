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

.PHONY: setup demo demo-video test bench bench-gpu env clean base-models

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

# The shipped shapes base models, as they were made: about 3 hours on 2 CPU cores (the same
# weights bit for bit only on the same CPU and torch build). Writes $(SHAPES_OUT); copy a
# model folder to src/dancegrpo/assets/shapes_<task>/ to ship it. The video models (4 frames)
# start from the image model's weights (inflated to every frame; see
# dancegrpo/worlds/shapes/pretrain.py) and can train side by side, one core each.
SHAPES_OUT ?= build/shapes
PRETRAIN   := $(PY) -m dancegrpo.worlds.shapes.pretrain --label-noise 0.25 --threads 1
base-models: setup
	$(PRETRAIN) --task t2i --steps 4500 --batch 32 --seed 0 --eval-n 128 --out $(SHAPES_OUT)/t2i_stage1
	$(PRETRAIN) --task t2i --steps 24000 --batch 32 --seed 1 --init $(SHAPES_OUT)/t2i_stage1 --out $(SHAPES_OUT)/t2i
	$(PRETRAIN) --task t2v --frames 4 --steps 4000 --batch 16 --lr 3e-4 --motion-weight 2 --seed 2 --init-image $(SHAPES_OUT)/t2i --snapshots 1000,2000,3000 --out $(SHAPES_OUT)/t2v
	$(PRETRAIN) --task i2v --frames 4 --steps 3000 --stop-after 1000 --batch 16 --lr 5e-4 --motion-weight 2 --seed 3 --init-image $(SHAPES_OUT)/t2i --out $(SHAPES_OUT)/i2v_stage1
	$(PRETRAIN) --task i2v --steps 2000 --batch 16 --lr 4e-4 --motion-weight 2 --contradict 0.6 --seed 4 --init $(SHAPES_OUT)/i2v_stage1 --out $(SHAPES_OUT)/i2v

# GRPO on the video models (text-to-video, image-to-video), two seeds side by side: before /
# after tables and GIFs in outputs/demo_video (python -m dancegrpo.demo_video --algorithm nft: DiffusionNFT).
demo-video: setup
	$(PY) -m dancegrpo.demo_video

clean:
	rm -rf $(VENV) build *.egg-info src/dancegrpo/_C*.so
