# The README's two commands: `make demo` and `make test`. Both install first: `demo` the package with every runtime
# extra (the whole CLI), `test` also the test and docs tools (pyproject.toml's extras; versions from constraints.txt).
# `make test` runs ruff (lint and format check) and mypy before pytest; `.ci/run` adds the slow tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS_all := all
EXTRAS_dev := all,test,docs

.PHONY: install demo test
install: $(VENV)/.installed-dev

$(VENV)/.installed-%: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS_$*)]'
	touch $@

demo: $(VENV)/.installed-all
	$(BIN)/mproxy demo

test: $(VENV)/.installed-dev  # lint, format and type checks, then the tests (slow ones: `pytest -m slow`)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 2  # two workers (pytest-xdist): each test runs on one thread (tests/conftest.py)
