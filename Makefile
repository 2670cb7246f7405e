# One entry point for set-up, tests, the offline demo and the benchmarks.
# `make test` on a fresh clone creates .venv, installs torch, then refine (editable, with dev tools).
# Re-running it on a set-up tree reinstalls nothing unless pyproject.toml changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.refine-installed
# The torch build is chosen here, not in pyproject.toml: a bare `torch` requirement lets pip pick a
# multi-GB CUDA build. Override for your machine, e.g. CPU-only wheels:
#   make test TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.14.1 torchvision==0.29.1

# Stay offline on purpose: no hub, no ultralytics downloads, no litellm cost map, textgrad logs aside.
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := False
export LITELLM_LOCAL_MODEL_COST_MAP := True
export TEXTGRAD_LOG_DIR ?= $(CURDIR)/.cache/textgrad-logs

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m refine.demo --control

bench: $(STAMP)
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check refine critics tests bench

clean:
	rm -rf .cache .pytest_cache .ruff_cache
