# kube-oidc-gate task runner. `make check` is what CI runs (via .ci/run).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev fmt lint type test test-fast test-compiled compiled check bench bench-plain bench-quick image clean

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
	$(BIN)/mypy --strict proxy tests benchmarks

test: install
	$(BIN)/pytest -q --durations=15

## The unit and property tests, under a minute: everything not marked `slow`
## (no subprocess, kubectl, npm provider or image build; see tests/conftest.py).
test-fast: install
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow"

## The wheel the image ships: the hot-path modules compiled with mypyc (see
## pyproject.toml). It is built in a copy of the working tree, so no compiled
## module is ever left beside the sources to shadow an edit; the copy, with
## the wheel unpacked over it, is where `test-compiled` and `bench` run.
COMPILED := build/compiled
compiled: install
	rm -rf build/wheels $(COMPILED)
	mkdir -p build/wheels $(COMPILED)
	git ls-files -z --cached --others --exclude-standard | \
	  xargs -0 -I{} cp --parents -P {} $(COMPILED)/
	cd $(COMPILED) && HATCH_BUILD_HOOKS_ENABLE=1 $(CURDIR)/$(BIN)/pip wheel -q \
	  --no-deps --no-build-isolation --wheel-dir $(CURDIR)/build/wheels .
	cd $(COMPILED) && $(CURDIR)/$(BIN)/python -m zipfile -e $(CURDIR)/build/wheels/kube_oidc_gate-*.whl .
	ln -sfn $(CURDIR)/tests/e2e/provider/node_modules $(COMPILED)/tests/e2e/provider/node_modules

## The whole suite again, against the compiled build (what the image runs).
test-compiled: compiled
	cd $(COMPILED) && PYTHONPATH=$(CURDIR)/$(COMPILED) KUBE_OIDC_GATE_EXPECT_COMPILED=1 \
	  $(CURDIR)/$(BIN)/pytest -q -p no:cacheprovider

## Everything CI checks: lint, types, the whole test suite, plain and compiled.
check: lint type test test-compiled

## The full benchmark, on the compiled build the image ships (the report
## says which build ran); `bench-plain` runs the sources for comparison.
bench: compiled
	cd $(COMPILED) && PYTHONPATH=$(CURDIR)/$(COMPILED) $(CURDIR)/$(BIN)/python \
	  -m benchmarks.run --out $(CURDIR)/benchmarks/results/$$(date -u +%Y%m%dT%H%M%SZ)

bench-plain: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

image:
	docker build -t kube-oidc-gate:dev .

clean:
	rm -rf $(VENV) build tests/e2e/provider/node_modules .mypy_cache .ruff_cache .pytest_cache
