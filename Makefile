# Wafer SEM defect classification: every stage is a file with real prerequisites.
#   make all                       # default run (params/base.yaml)
#   make all PARAMS=params/x.yaml  # overlay(s) applied over params/base.yaml, in order
#   make help                      # list the targets

SHELL := /bin/bash
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PARAMS  ?= params/base.yaml
BUILD   ?= build
REPORTS ?= reports
VENV    ?= .venv
PYTHON  ?= python3.11
PY      := $(VENV)/bin/python
ENV     := $(VENV)/.ready
# make test: pytest-xdist workers. Much of the suite is single-threaded (notebook kernels starting, ONNX
# export, HTML rendering), so two workers keep both cores busy; 0 runs it in one process.
TEST_WORKERS ?= 2

# glibc's malloc hands every block over 32 MB (a batch of activations) back to the kernel when freed,
# so each forward pass faults its pages in again. On a VM where a page fault is dear, that was half the
# CPU time: EfficientNet-Lite0 inference ran 3.1x faster with the heap kept (README, "Training speed",
# which also says what it costs in memory). These keep it; a value set in the environment wins.
# Linux/glibc only; elsewhere ignored.
export MALLOC_MMAP_MAX_       ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 100000000000

LIB       := $(wildcard lib/*.py lib/*/*.py)
STAGEPAR  := $(BUILD)/params
DATASET   := $(BUILD)/dataset.json
NB        := $(BUILD)/notebooks
# A stage reruns when a key it declares changes (its prerequisite $(STAGEPAR)/<stage>.yaml), and runs
# with the whole resolved set (all.yaml), which it records beside its artifacts. A cell may run a day: training
# tens of thousands of images on a CPU takes hours (an hour's limit stopped a 50,000-image run).
RUN_NB     = $(PY) -m lib.notebooks $< --params $(STAGEPAR)/all.yaml --timeout 86400 \
               --executed $(NB)/$(notdir $<) --html $@

EDA    := $(REPORTS)/01_eda.html
AUDIT  := $(REPORTS)/02_leakage_audit.html
TRAIN  := $(REPORTS)/03_training.html
EVAL   := $(REPORTS)/04_evaluation.html
EXPORT := $(REPORTS)/05_export.html
INDEX  := $(REPORTS)/index.html

CV     := $(REPORTS)/06_cross_validation.html
DATA   ?=

.PHONY: all help env data eda audit train eval export cv pretrain sweep test test-unit lab bench clean clean-all FORCE

all: $(INDEX) ## run the whole pipeline and render reports/ (creates the environment if missing)

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "  variables: PARAMS=$(PARAMS) BUILD=$(BUILD) REPORTS=$(REPORTS) VENV=$(VENV)"

env: $(ENV) ## create the virtual environment (.venv) from requirements.txt

# The environment, timed: .ready records how long its creation took (the index shows it).
$(ENV): requirements.txt pyproject.toml
	@start=$$(date +%s); set -e; \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	echo "$(PY) -m pip install --quiet --upgrade pip"; $(PY) -m pip install --quiet --upgrade pip; \
	echo "$(PY) -m pip install --quiet -r requirements.txt"; $(PY) -m pip install --quiet -r requirements.txt; \
	$(PY) -m pip install --quiet --no-deps -e .; \
	printf '{"seconds": %d}\n' $$(( $$(date +%s) - start )) > $@

# Resolved parameters, one file per stage, rewritten only when their content changes,
# so a stage reruns only when a key it reads changed.
$(STAGEPAR)/all.yaml: FORCE | $(ENV)
	@$(PY) -m lib.params $(PARAMS) --set build_dir=$(BUILD) --out-dir $(STAGEPAR)
$(STAGEPAR)/%.yaml: $(STAGEPAR)/all.yaml ;

# The dataset's fingerprint: renders the embedded synthetic set when data_dir is empty (into
# synthetic_dir, a folder the project owns; never into one it did not create); rewritten only
# when the files under the image folder changed. Your own data_dir is only ever read.
$(DATASET): $(STAGEPAR)/data.yaml $(wildcard lib/synthetic/*.py) lib/plant.py lib/data.py lib/io.py FORCE | $(ENV)
	@$(PY) -m lib.data prepare --params $(STAGEPAR)/data.yaml --out $@

data: $(DATASET) ## render the embedded dataset (when data_dir is empty) and fingerprint the image folder

# A stage's own record is a prerequisite of its report: a notebook run by hand (JupyterLab) rewrites
# <build>/<stage>/params.json after the report, so make knows the stage is no longer what it reported.
STAGE_RECORD = $(wildcard $(BUILD)/$(1)/params.json)

$(EDA): notebooks/01_eda.ipynb $(STAGEPAR)/01_eda.yaml $(DATASET) $(LIB) $(call STAGE_RECORD,eda)
	$(RUN_NB)
eda: $(EDA) ## 01: dataset inventory

$(AUDIT): notebooks/02_leakage_audit.ipynb $(STAGEPAR)/02_leakage_audit.yaml $(EDA) $(LIB) $(call STAGE_RECORD,split)
	$(RUN_NB)
audit: $(AUDIT) ## 02: duplicate detection and the leak-free split

$(TRAIN): notebooks/03_training.ipynb $(STAGEPAR)/03_training.yaml $(AUDIT) $(LIB) $(call STAGE_RECORD,train)
	$(RUN_NB)
train: $(TRAIN) ## 03: train the model the params name (default: EfficientNet-Lite0, recipe partial)

$(EVAL): notebooks/04_evaluation.ipynb $(STAGEPAR)/04_evaluation.yaml $(TRAIN) $(LIB) $(call STAGE_RECORD,eval)
	$(RUN_NB)
eval: $(EVAL) ## 04: test-split metrics, confusion matrices, error gallery

$(EXPORT): notebooks/05_export.ipynb $(STAGEPAR)/05_export.yaml $(EVAL) $(LIB) $(call STAGE_RECORD,export)
	$(RUN_NB)
export: $(EXPORT) ## 05: ONNX + INT8 export, parity, latency, the deployment bundle

# Width sweep: the whole pipeline once per MobileNetV2 width, each in its own build folder
# (PARAMS plus a one-key overlay), then the accuracy-vs-latency and -vs-size frontier.
# Long (a full training per width); not part of `all` or `test`.
SWEEP        := $(BUILD)/sweep
SWEEP_WIDTHS ?= 1.0 0.75 0.5 0.35

sweep: $(STAGEPAR)/all.yaml ## train and export each MobileNetV2 width (SWEEP_WIDTHS), then the frontier in sweep.html
	@set -e; for w in $(SWEEP_WIDTHS); do \
	  printf 'arch: mobilenet_v2\nwidth: %s\n' $$w > $(STAGEPAR)/width_$$w.yaml; \
	  echo "== width $$w -> $(SWEEP)/w$$w"; \
	  $(MAKE) --no-print-directory all PARAMS="$(PARAMS) $(STAGEPAR)/width_$$w.yaml" BUILD=$(SWEEP)/w$$w \
	    REPORTS=$(SWEEP)/w$$w/reports; \
	done
	$(PY) -m lib.notebooks notebooks/sweep.ipynb --params $(STAGEPAR)/all.yaml --executed $(NB)/sweep.ipynb \
	  --html $(REPORTS)/sweep.html

# Cross-validation of the cv_configs on any image folder (not part of `all`): its own
# parameter files under $(BUILD)/cv, so the main run's stages stay up to date.
cv: $(ENV) ## 06: group k-fold CV report on DATA=<image folder> (compares cv_configs, shift table)
	@test -n "$(DATA)" || { echo "usage: make cv DATA=<image folder> [PARAMS=...]" >&2; exit 2; }
	@test -d "$(DATA)" || { echo "error: DATA folder not found: $(DATA)" >&2; exit 2; }
	@$(PY) -m lib.params $(PARAMS) --set build_dir=$(BUILD) --set data_dir=$(abspath $(DATA)) \
	    --out-dir $(BUILD)/cv/params
	$(PY) -m lib.notebooks notebooks/06_cross_validation.ipynb --params $(BUILD)/cv/params/all.yaml --timeout 86400 \
	    --executed $(NB)/06_cross_validation.ipynb --html $(CV)

pretrain: $(STAGEPAR)/all.yaml ## train (or reuse) the synthetic-pretrained body for the params' arch (weights: synthetic)
	$(PY) -m lib.pretrain --params $(STAGEPAR)/all.yaml

$(INDEX): $(EDA) $(AUDIT) $(TRAIN) $(EVAL) $(EXPORT) $(LIB)
	$(PY) -m lib.index --build $(BUILD) --reports $(REPORTS) --venv $(VENV)

test: $(ENV) ## run the whole test suite: unit, data and end-to-end (every README route at small size)
	$(PY) -m pytest -n $(TEST_WORKERS)

test-unit: $(ENV) ## run the unit tier only (seconds)
	$(PY) -m pytest -m unit -q

# JupyterLab refuses to start as root (a container's usual user) unless told to.
lab: $(ENV) ## JupyterLab on the notebooks (lib importable, no path hacks)
	$(VENV)/bin/jupyter lab --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root)

bench: $(ENV) ## benchmark scripts (figures quoted in the README)
	$(PY) tests/benchmarks/bench_synthetic.py
	$(PY) tests/benchmarks/bench_leakage.py
	$(PY) tests/benchmarks/bench_predict.py
	$(PY) tests/benchmarks/bench_training.py

# Only what the project created goes: folders carrying its marker, and its report files.
clean: ## remove artifacts and reports (keeps data/ and .venv; never touches folders the project did not create)
	$(PYTHON) -m lib.io clean --build $(BUILD) --reports $(REPORTS)

clean-all: clean ## also remove the rendered datasets under data/ and the environment
	$(PYTHON) -m lib.io clean --data data
	rm -rf $(VENV)

FORCE:
