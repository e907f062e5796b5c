# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LINTED := proxy tests scripts deploy $(wildcard bench)
STAMP := $(VENV)/.installed
# The product alone (`make run`, the bundle): no test tools.
RUN_STAMP := $(VENV)/.installed-run
# Every dependency of the proxy and its tests, pinned (scripts/lock.py): the venv installs
# through it, and deploy/databricks/requirements.txt is its run-time part.
LOCK := requirements.lock

.PHONY: run test bench lint typecheck pytest system-deps bench-deps screenshots clean lock \
	databricks-bundle

run: $(RUN_STAMP)
	$(BIN)/tts-cache-proxy demo

test: $(STAMP) system-deps lint typecheck pytest

# The benchmark (bench/README.md): under 6 minutes, writes bench/results/latest.{md,json,png}.
bench: $(STAMP) bench-deps
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[bench]'
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

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[test]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e .
	touch $(RUN_STAMP)

# After a change of dependencies in pyproject.toml: resolve them again on PyPI (uv), install the
# venv from the new lock, and write the pins the Databricks App installs.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'uv>=0.5,<1'
	$(BIN)/python scripts/lock.py compile
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[test]'
	$(BIN)/python scripts/lock.py deploy
	touch $(STAMP)

# A folder to deploy as a Databricks App: the legacy app in LEGACY behind the proxy, in OUT
# (README: "Deploy on Databricks Apps").
databricks-bundle: $(RUN_STAMP)
	@test -n "$(LEGACY)" -a -n "$(OUT)" || \
		{ echo "usage: make databricks-bundle LEGACY=path/to/legacy/app OUT=new/folder" >&2; exit 2; }
	$(BIN)/python deploy/databricks/bundle.py --legacy "$(LEGACY)" --out "$(OUT)"

# Debian packages the tests use, installed only where missing.
system-deps:
	@scripts/system-deps.sh

# wrk and nginx-light for `make bench`, installed only where missing.
bench-deps:
	@scripts/bench-deps.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
