# Two commands do all the set-up on a fresh machine:
#   make demo   - installs a virtual environment and runs `convoy run` on sample photographs
#   make test   - runs the test suite (make test-slow: the slow tests; CI runs both)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
IMAGES ?= 400
INPUT_SIZE ?= 150
WEIGHTS ?= none
MODEL ?= vgg16
DEMO_DIR ?= demo

.PHONY: demo test test-slow lint install

$(BIN)/convoy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/convoy

install: $(BIN)/convoy

demo: $(BIN)/convoy
	test -d $(DEMO_DIR)/data || $(BIN)/convoy sample $(DEMO_DIR)/data --images $(IMAGES)
	$(BIN)/convoy run $(DEMO_DIR)/data --out $(DEMO_DIR)/out --model $(MODEL) --weights $(WEIGHTS) --input-size $(INPUT_SIZE)

test: $(BIN)/convoy
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

test-slow: $(BIN)/convoy
	$(BIN)/python -m pytest -ra -m slow $(PYTEST_ARGS)

lint: $(BIN)/convoy
	$(BIN)/ruff check .
