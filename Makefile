# Two commands do all the set-up on a fresh machine:
#   make demo   - installs a virtual environment and runs `convoy run` on sample photographs
#   make test   - runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
IMAGES ?= 400
INPUT_SIZE ?= 150
WEIGHTS ?= none
DEMO_DIR ?= demo

.PHONY: demo test lint install

$(BIN)/convoy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/convoy

install: $(BIN)/convoy

demo: $(BIN)/convoy
	test -d $(DEMO_DIR)/data || $(BIN)/convoy sample $(DEMO_DIR)/data --images $(IMAGES)
	$(BIN)/convoy run $(DEMO_DIR)/data --out $(DEMO_DIR)/out --weights $(WEIGHTS) --input-size $(INPUT_SIZE)

test: $(BIN)/convoy
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

lint: $(BIN)/convoy
	$(BIN)/ruff check .
