# Quick start: `make repro` (main job on the embedded synthetic default) and `make test`.
# Both install the project first: into the active virtualenv if there is one, else into ./.venv.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
BIN := $(VENV)/bin
export PATH := $(BIN):$(PATH)
export SPML_NO_PROGRESS ?=

.PHONY: install repro test bench clean

install: $(VENV)/.spml-installed

$(VENV)/.spml-installed: pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

repro: install
	dvc repro

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf data runs .dvc/tmp .dvc/cache
