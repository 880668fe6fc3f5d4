# Two commands do all the set-up on a fresh machine:
#   make demo   - installs a virtual environment (what running needs) and runs `convoy run` on
#                 sample photographs
#   make test   - adds the test tools and runs the test suite (make test-slow: the slow tests; CI
#                 runs both)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
IMAGES ?= 400
INPUT_SIZE ?= 150
WEIGHTS ?= none
MODEL ?= vgg16
DEMO_DIR ?= demo

# What running needs (`make demo`), and what the tests add on top (`make install`, `test`, `lint`).
TEST_DEPS := $(VENV)/.test-deps

.PHONY: demo test test-slow lint install

$(BIN)/convoy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(BIN)/convoy

$(TEST_DEPS): $(BIN)/convoy
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(TEST_DEPS)

install: $(TEST_DEPS)

demo: $(BIN)/convoy
	test -d $(DEMO_DIR)/data || $(BIN)/convoy sample $(DEMO_DIR)/data --images $(IMAGES)
	$(BIN)/convoy run $(DEMO_DIR)/data --out $(DEMO_DIR)/out --model $(MODEL) --weights $(WEIGHTS) --input-size $(INPUT_SIZE)

test: $(TEST_DEPS)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

test-slow: $(TEST_DEPS)
	$(BIN)/python -m pytest -ra -m slow $(PYTEST_ARGS)

lint: $(TEST_DEPS)
	$(BIN)/ruff check .
