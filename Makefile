# Thin wrappers. Every target creates .venv (and installs requirements.txt) when it is missing.
PROFILE ?= cpu
PUBLISH ?=  # PUBLISH=1: replace the committed adapters (train) or figures/<profile>/ (reproduce): --publish
ARGS ?=     # extra arguments: make lab ARGS="--port 8899 --no-browser"; make reproduce ARGS="--overrides n_eval=16"
PYTHON ?= python3
PY := .venv/bin/python
TEST_WORKERS ?= 2
STAMP := .venv/.installed-$(shell sha256sum requirements.txt | cut -c1-12)

.PHONY: setup reproduce test test-slow smoke train train-check train-sweep bench lab kernel clean-runs

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f .venv/.installed-* && touch $@

setup: $(STAMP)

reproduce: setup  ## run notebooks/NN_*.ipynb in order on PROFILE (default cpu) through papermill
	$(PY) scripts/run_notebooks.py --profile $(PROFILE) $(if $(PUBLISH),--publish) $(ARGS)

test: setup  ## fast tests (tiny model, seconds), in TEST_WORKERS processes (default 2: one per core here)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

test-slow: setup  ## slow tests: real-model runs, process-level kill/resume and bench dry runs (minutes)
	$(PY) -m pytest -q -m slow tests

smoke: setup  ## the whole series on the tiny profile, training notebook included (what CI runs after the tests)
	$(PY) scripts/run_notebooks.py --profile tiny --train

train: setup  ## train every arm and seed of PROFILE's recipe, two at a time (training.py; ~35 min on cpu; PUBLISH=1 into adapters/)
	$(PY) scripts/train_adapters.py --profile $(PROFILE) --jobs 2 $(if $(PUBLISH),--publish)

train-check: setup  ## retrain one committed adapter (ARM=lat-s0; BUDGET=0.14: of the v3 sweep) and compare it byte for byte
	$(PY) scripts/train_adapters.py --profile $(PROFILE) $(if $(BUDGET),--budget $(BUDGET)) --check $(or $(ARM),lat-s0)

train-sweep: setup  ## training v3: every point of PROFILE's budget sweep not yet trained, two at a time (PUBLISH=1 into adapters/)
	$(PY) scripts/train_adapters.py --profile $(PROFILE) --sweep --jobs 2 $(if $(PUBLISH),--publish)

bench: setup  ## side-by-side benchmarks on PROFILE, written to BENCHMARKS.md
	$(PY) bench/run_all.py --profile $(PROFILE)

lab: setup  ## JupyterLab on this venv, opened in notebooks/ (Ctrl-C stops it); ARGS="--port 8899 --no-browser" (as root: --allow-root is added)
	.venv/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

kernel: setup  ## register this venv as the kernel "refusal-lat" for a Jupyter you already have
	$(PY) -m ipykernel install --user --name refusal-lat --display-name "Python (refusal-lat)"

clean-runs:
	rm -rf runs/
