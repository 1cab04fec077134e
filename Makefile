# M4CXR reproduction. `make all` sets up .venv and runs every notebook; `make test` runs the tests.
# PRESET=smoke|tiny|paper (default tiny) or PRESET=path/to/my.yaml (a preset of your own, README).
# Executed notebooks and artifacts go to build/<preset>/ (build/<file name without .yaml> for a file).
# OVERRIDES="key.path=value ..." changes the preset in every notebook (use a fresh BUILD=...).
# FULL=1 runs notebook 08's complete ablation sweep.

PRESET ?= tiny
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KERNEL := m4cxr
FIGURES ?= figures
PYTEST_ARGS ?=
OVERRIDES ?=
FULL ?= 0

# A built-in preset is a name; a user's preset is the path of a YAML file (it inherits a built-in
# one, so a change to cxrlib/presets/ re-runs its notebooks too). PRESET_FILE is what make watches.
BUILTIN_PRESETS := $(wildcard cxrlib/presets/*.yaml)
ifneq ($(filter %.yaml %.yml,$(PRESET)),)
ifeq ($(wildcard $(PRESET)),)
$(error preset file '$(PRESET)' does not exist: create it first, e.g. `cp cxrlib/presets/tiny.yaml $(PRESET)` (README, "A preset of your own"))
endif
PRESET_NAME := $(basename $(notdir $(PRESET)))
PRESET_FILE := $(PRESET) $(BUILTIN_PRESETS)
else ifneq ($(filter $(PRESET),smoke tiny paper),)
PRESET_NAME := $(PRESET)
PRESET_FILE := cxrlib/presets/$(PRESET).yaml cxrlib/presets/tiny.yaml
else
$(error unknown PRESET '$(PRESET)': use PRESET=smoke, PRESET=tiny (default), PRESET=paper or PRESET=path/to/my.yaml)
endif
BUILD ?= build/$(PRESET_NAME)

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]-*.ipynb))
EXECUTED := $(patsubst notebooks/%,$(BUILD)/notebooks/%,$(NOTEBOOKS))
STAMP := $(VENV)/.installed
RUN_NOTEBOOK := $(PY) -m cxrlib.run_notebook --preset $(PRESET) --output-dir $(BUILD) --figure-dir $(FIGURES) --overrides "$(OVERRIDES)"

.DEFAULT_GOAL := help
.PHONY: help all smoke install test lint format lab clean clean-all benchmarks

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: PRESET=smoke|tiny|paper|my.yaml (default tiny), BUILD=$(BUILD), FIGURES=$(FIGURES)"
	@echo "             OVERRIDES=\"lora.r=16 train.phase2.steps=50\" (preset changes; use a fresh BUILD)"
	@echo "             FULL=1 (notebook 08: the complete ablation sweep instead of the make-all one)"

install: $(STAMP) ## create .venv, install cxrlib with its dependencies and the Jupyter kernel

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import cxrlib, torch, transformers, peft, timm, papermill"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (m4cxr)" >/dev/null
	@# git strips notebook outputs when it reads a notebook (diff, add, commit): lab sessions stay local
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then $(VENV)/bin/nbstripout --install; fi
	@touch $@

all: $(EXECUTED) ## run every notebook in order with papermill (PRESET=tiny) and regenerate figures/
	@echo "done: executed notebooks in $(BUILD)/notebooks, figures in $(FIGURES)/"

smoke: ## the same pipeline with the smoke preset, into build/smoke (figures too)
	$(MAKE) all PRESET=smoke BUILD=build/smoke FIGURES=build/smoke/figures

# One rule runs any notebook; the lines below it are the real hand-offs between stages, so an
# unchanged stage is not re-run.
$(BUILD)/notebooks/%.ipynb: notebooks/%.ipynb $(PRESET_FILE) $(STAMP)
	$(RUN_NOTEBOOK)$(if $(NOTEBOOK_PARAMS), $(NOTEBOOK_PARAMS)) $< $@

DATA_LIB := $(wildcard cxrlib/data/*.py)
MODEL_LIB := $(wildcard cxrlib/model/*.py) cxrlib/tokenizer.py
TRAIN_LIB := cxrlib/train.py cxrlib/engine.py cxrlib/phases.py cxrlib/backbones.py
EVAL_LIB := cxrlib/inference.py cxrlib/answers.py cxrlib/labeler.py cxrlib/metrics.py cxrlib/evaluate.py
nb = $(BUILD)/notebooks/$(1).ipynb
$(call nb,00-overview): cxrlib/plotting.py
$(call nb,01-data-prep): $(DATA_LIB)
$(call nb,02-backbones): $(call nb,01-data-prep) $(MODEL_LIB) $(TRAIN_LIB)
$(call nb,03-projector-pretraining): $(call nb,02-backbones)
$(call nb,04-instruction-tuning-lora): $(call nb,03-projector-pretraining)
$(call nb,05-cot-inference): $(call nb,04-instruction-tuning-lora) $(EVAL_LIB)
$(call nb,06-evaluation): $(call nb,05-cot-inference)
$(call nb,07-explorer): $(call nb,05-cot-inference)
# Notebook 08 trains its arms (cached by configuration); FULL=1 runs the complete sweep (and
# re-runs the notebook even when it is up to date).
$(call nb,08-ablations): $(call nb,05-cot-inference) cxrlib/ablations.py $(TRAIN_LIB) $(EVAL_LIB) $(if $(filter 1,$(FULL)),FORCE)
$(call nb,08-ablations): NOTEBOOK_PARAMS = --param FULL=$(FULL)
.PHONY: FORCE
FORCE:

test: $(STAMP) ## run the whole test suite (unit tests and smoke runs of every notebook)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check cxrlib tests benchmarks notebooks
	$(VENV)/bin/ruff format --check cxrlib tests benchmarks notebooks

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix cxrlib tests benchmarks notebooks
	$(VENV)/bin/ruff format cxrlib tests benchmarks notebooks

lab: $(STAMP) ## open JupyterLab on the notebooks with the project's kernel
	$(VENV)/bin/jupyter lab notebooks

benchmarks: $(STAMP) ## print speed and memory figures (tiny preset, CPU)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean: ## remove executed notebooks and artifacts (build/) and caches; keeps .venv and figures/
	rm -rf build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

clean-all: clean ## also remove .venv
	rm -rf $(VENV)
