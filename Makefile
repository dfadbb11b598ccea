# kube-oidc-gate task runner. `make check` is what CI runs (via .ci/run).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev fmt lint type test test-fast check bench bench-quick image clean

$(STAMP): pyproject.toml tests/e2e/provider/package-lock.json .ci/install-system.sh
	bash .ci/install-system.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	npm ci --silent --no-audit --no-fund --prefix tests/e2e/provider
	touch $(STAMP)

install: $(STAMP)

## Run the service on its embedded development issuer (no IdP needed).
dev: install
	$(BIN)/kube-oidc-gate webhook --dev --log-format text

fmt: install
	$(BIN)/ruff format proxy tests benchmarks
	$(BIN)/ruff check --fix proxy tests benchmarks

lint: install
	$(BIN)/ruff check proxy tests benchmarks
	$(BIN)/ruff format --check proxy tests benchmarks
	$(BIN)/lint-imports

type: install
	$(BIN)/mypy --strict proxy tests

test: install
	$(BIN)/pytest -q --durations=15

## Everything CI checks: lint, types, the whole test suite.
check: lint type test

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

image:
	docker build -t kube-oidc-gate:dev .

clean:
	rm -rf $(VENV) tests/e2e/provider/node_modules .mypy_cache .ruff_cache .pytest_cache
