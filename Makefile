# The two commands of the README: `make demo` runs the main job on the embedded
# MongoDB and the demo corpus; `make test` runs the test suite. Both create or
# update .venv with pip first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-data

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(BIN)/python -m pipelines.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-data:
	rm -rf data .dagster_home
