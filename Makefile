# The two commands of the README. Both install into ./.venv first (idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?= -m "not slow"

.PHONY: run test install test-all

install:
	scripts/install.sh

run: install
	.venv/bin/moedist demo

test:
	scripts/install.sh test
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all:
	scripts/install.sh test
	$(PY) -m pytest -q
