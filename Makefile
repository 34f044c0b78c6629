# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

TOY    := tests/plugins/keyturn-toy

$(STAMP): pyproject.toml $(TOY)/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the toy plugin is installed like a third party's: its own distribution, its entry points
	$(BIN)/python -m pip install --quiet -e '.[dev,aws,vault]' -e $(TOY)
	touch $(STAMP)

## The main job: a real service-account key rotation against a local sandbox (SQLite).
demo: $(STAMP)
	$(BIN)/keyturn demo

## Quality gates, then the whole suite on SQLite and PostgreSQL (what CI runs).
test: $(STAMP) lint
	$(BIN)/pytest -n 2 --dist loadgroup --durations=30 tests --ignore=tests/bench

## Inner loop: gates and the unit tests only (seconds).
test-fast: $(STAMP) lint
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check src tests migrations
	$(BIN)/ruff format --check src tests migrations
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/lint-imports --config $(TOY)/pyproject.toml

bench: $(STAMP)
	$(BIN)/pytest -q -s tests/bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
