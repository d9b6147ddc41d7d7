# One task runner: every target sets up what it needs (virtual environment,
# locked dependencies, tools) and does exactly what README.md and CI say.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# PY_VERSION picks the interpreter (3.11, 3.12 or 3.13); each version gets its own venv,
# so `make test PY_VERSION=3.13` never disturbs the everyday .venv.
PY_VERSION ?= 3.11
PYTHON ?= $(shell scripts/find-python $(PY_VERSION) 2>/dev/null || echo python$(PY_VERSION))
VENV ?= $(if $(filter 3.11,$(PY_VERSION)),.venv,.venv-$(PY_VERSION))
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements/dev.lock pyproject.toml | cksum | cut -d' ' -f1)
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
PROTOS := $(wildcard protos/blog/v1/*.proto)

.PHONY: help venv generate check lint typecheck import-check buf-lint buf-breaking generated-fresh \
        test test-faults test-integration run migrate bench bench-quick lock clean \
        monitoring-check

help:
	@echo "make run          serve on the embedded SQLite default (sets everything up)"
	@echo "make test         run the test suite on PostgreSQL and SQLite (PY_VERSION=3.12|3.13 too)"
	@echo "make test-faults  the fault suite: database cuts, signals, leaks, fuzzing"
	@echo "make test-integration  PgBouncer, a streaming replica, Prometheus"
	@echo "make check        ruff, mypy --strict, import direction, buf lint/breaking, hadolint,"
	@echo "                  generated code fresh, alert rules (promtool check/test rules)"
	@echo "make generate     regenerate generated/ from protos/"
	@echo "make migrate      bring DATABASE_URL's schema to the newest revision"
	@echo "make bench        full benchmark run; make bench-quick: a short one"
	@echo "make lock         re-resolve requirements/*.lock from pyproject.toml"

venv: $(STAMP)

$(STAMP): requirements/dev.lock pyproject.toml
	@scripts/find-python $(PY_VERSION) >/dev/null
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

# Layers import downwards only (docs/ARCHITECTURE.md, "What each folder may import").
import-check: $(STAMP)
	$(BIN)/python scripts/check-imports.py

buf-lint: $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code

buf-breaking: $(BUF)
	./scripts/buf-breaking.sh $(BUF)

hadolint: $(STAMP)
	$(BIN)/hadolint Dockerfile

# Alert rules (promtool check/test rules; installs Debian's `prometheus` when missing).
monitoring-check:
	scripts/check-monitoring

check: lint typecheck import-check buf-lint buf-breaking generated-fresh hadolint monitoring-check

# The everyday suite; the fault and integration suites start real processes and faults
# (throwaway clusters, PgBouncer, Prometheus) and run in CI once, on 3.11.
test: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/faults --ignore=tests/integration $(PYTEST_ARGS)

test-faults: $(STAMP)
	$(BIN)/python -m pytest tests/faults $(PYTEST_ARGS)

test-integration: $(STAMP)
	scripts/ensure-debian-packages pgbouncer:pgbouncer prometheus:prometheus
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

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
	PYTHONPATH=$(TOOLS)/uv $(PYTHON) -m uv pip compile pyproject.toml --universal --python-version 3.11 \
	    --generate-hashes -q -o requirements/runtime.lock
	PYTHONPATH=$(TOOLS)/uv $(PYTHON) -m uv pip compile pyproject.toml --universal --python-version 3.11 \
	    --extra dev --generate-hashes -q -o requirements/dev.lock

clean:
	rm -rf .venv .venv-3.* $(TOOLS) .mypy_cache .ruff_cache .pytest_cache blog.db blog.db-*
