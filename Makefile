# ssfer: every target creates the environment first when it is missing (or when requirements.txt changed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-12)
STAMP := $(VENV)/.ssfer-env-$(REQ_HASH)

export MPLBACKEND ?= Agg
export YOLO_OFFLINE ?= 1
export YOLO_CONFIG_DIR ?= $(CURDIR)/.cache/ultralytics
export PYTHONHASHSEED ?= 0
# this checkout's ssfer_lib wins over whatever the (possibly shared, cached) venv's editable install points at
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help env demo test test-fast nbtest pytest bench export check-sync lab tensorboard docs docs-serve readme lock clean-env

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP):  # its name holds the hash of requirements.txt: exists = up to date (mtimes of a fresh clone mean nothing)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -r requirements.txt
	@rm -f $(VENV)/.ssfer-env-*; touch $@

env: $(STAMP)  ## create/refresh the virtualenv and install this checkout (editable)
	@env -u PYTHONPATH $(BIN)/python -P -c "import pathlib, ssfer_lib, sys; sys.exit(pathlib.Path(ssfer_lib.__file__).resolve().parent != pathlib.Path('ssfer_lib').resolve())" 2>/dev/null \
	  || $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .

demo: env  ## the main job: all three stages and every table on SynthFaces (CPU, no downloads)
	$(BIN)/ssfer reproduce --preset demo --jobs 2  # two cells at a time, one thread each (2 cores)

test: env  ## all tests: notebook examples (incl. slow cells) and pytest (incl. slow end-to-end)
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --flags slow --n_workers 2  # 2 notebooks at a time, 1 thread each
	$(BIN)/python -m pytest -q -rs  # -rs: name every skipped test and why (e.g. real data absent)

test-fast: env  ## quick loop: notebook examples without slow cells, pytest without slow tests
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2
	$(BIN)/python -m pytest -q -rs -m "not slow"

bench: env  ## speed/memory benchmarks, results in outputs/bench/
	$(BIN)/ssfer bench

export: env  ## export nbs/ into ssfer_lib/
	$(BIN)/nbdev_export

check-sync: env  ## fail if ssfer_lib/ differs from what nbs/ export
	$(BIN)/nbdev_export
	@if [ -n "$$(git status --porcelain -- ssfer_lib)" ]; then \
	  git status --porcelain -- ssfer_lib; \
	  echo "ERROR: ssfer_lib/ is out of sync with nbs/. Edit the notebooks, run 'make export' and commit both."; exit 1; fi
	@echo "ssfer_lib/ is in sync with nbs/"

lab: env  ## open the notebooks in JupyterLab (nbs/explore/: the playgrounds)
	$(BIN)/jupyter lab nbs

tensorboard: env  ## training curves of every run (event files written by fit into each run folder)
	$(BIN)/tensorboard --logdir outputs/runs

DOCS_EXECUTE ?= 3*
docs: env  ## the documentation site into _docs/ (notebooks matching DOCS_EXECUTE run first for their figures; none: as stored)
	$(BIN)/python tools/docs.py --execute '$(DOCS_EXECUTE)'

DOCS_ADDRESS ?= 127.0.0.1:8000
docs-serve: env  ## build and serve the documentation site on http://$(DOCS_ADDRESS)
	$(BIN)/python tools/docs.py --execute '$(DOCS_EXECUTE)' --serve $(DOCS_ADDRESS)

readme: env  ## README.md from nbs/index.ipynb (after a merge that edited README.md: python tools/readme.py --import)
	$(BIN)/python tools/readme.py

lock:  ## regenerate requirements.txt from requirements.in in a scratch venv
	rm -rf /tmp/ssfer-lock && $(PYTHON) -m venv /tmp/ssfer-lock && /tmp/ssfer-lock/bin/pip install -q -r requirements.in
	(head -1 requirements.txt; /tmp/ssfer-lock/bin/pip freeze) > requirements.txt

clean-env:  ## remove the virtualenv
	rm -rf $(VENV)
