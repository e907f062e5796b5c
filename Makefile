# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LINTED := proxy tests $(wildcard bench)
STAMP := $(VENV)/.installed

.PHONY: run test bench lint typecheck pytest system-deps bench-deps screenshots clean

run: $(STAMP)
	$(BIN)/tts-cache-proxy demo

test: $(STAMP) system-deps lint typecheck pytest

# The benchmark (bench/README.md): under 6 minutes, writes bench/results/latest.{md,json,png}.
bench: $(STAMP) bench-deps
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(BIN)/mypy --strict proxy

pytest: $(STAMP)
	$(BIN)/pytest -q

# The dashboard screenshots in docs/screenshots, from real traffic in headless Chromium.
screenshots: $(STAMP) system-deps
	UPDATE_SCREENSHOTS=1 $(BIN)/pytest -q tests/e2e/test_screenshots.py

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the tests use, installed only where missing.
system-deps:
	@scripts/system-deps.sh

# wrk and nginx-light for `make bench`, installed only where missing.
bench-deps:
	@scripts/bench-deps.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
