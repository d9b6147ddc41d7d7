# One task runner: every target sets up what it needs (virtual environment,
# locked dependencies, tools) and does exactly what README.md and CI say.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements/dev.lock pyproject.toml | cksum | cut -d' ' -f1)
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
PROTOS := $(wildcard protos/blog/v1/*.proto)

.PHONY: help venv generate check lint typecheck buf-lint buf-breaking generated-fresh \
        test run migrate bench bench-quick lock clean

help:
	@echo "make run          serve on the embedded SQLite default (sets everything up)"
	@echo "make test         run the test suite on PostgreSQL and SQLite"
	@echo "make check        ruff, mypy --strict, buf lint/breaking, hadolint, generated code fresh"
	@echo "make generate     regenerate generated/ from protos/"
	@echo "make migrate      bring DATABASE_URL's schema to the newest revision"
	@echo "make bench        full benchmark run; make bench-quick: a short one"
	@echo "make lock         re-resolve requirements/*.lock from pyproject.toml"

venv: $(STAMP)

$(STAMP): requirements/dev.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

$(BUF):
	@command -v npm >/dev/null || { echo "error: npm not found; install Node.js and npm (Debian: apt-get install npm)" >&2; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

generate: $(STAMP)
	./scripts/generate.sh generated

generated-fresh: $(STAMP)
	./scripts/check-generated.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

buf-lint: $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code

buf-breaking: $(BUF)
	./scripts/buf-breaking.sh $(BUF)

hadolint: $(STAMP)
	$(BIN)/hadolint Dockerfile

check: lint typecheck buf-lint buf-breaking generated-fresh hadolint

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: $(STAMP)
	$(BIN)/python -m service serve --migrate

migrate: $(STAMP)
	$(BIN)/python -m service migrate

bench: $(STAMP)
	$(BIN)/python -m bench --full

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

lock:
	$(PYTHON) -m pip install -q uv==0.13.9 --target $(TOOLS)/uv
	PYTHONPATH=$(TOOLS)/uv $(PYTHON) -m uv pip compile pyproject.toml --generate-hashes -q \
	    --python-version 3.11 --python-platform x86_64-unknown-linux-gnu -o requirements/runtime.lock
	PYTHONPATH=$(TOOLS)/uv $(PYTHON) -m uv pip compile pyproject.toml --extra dev --generate-hashes -q \
	    --python-version 3.11 --python-platform x86_64-unknown-linux-gnu -o requirements/dev.lock

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache blog.db blog.db-*
