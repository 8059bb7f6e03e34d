# Every target creates .venv from nothing when it is missing; nothing depends on hand installs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/quickstart.yaml
# pytest-xdist workers for make test: Ray tests share one of them (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: setup browser run run-text test test-fast bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# pip byte-compiles one file at a time; compileall on every core does the same in ~2/3 of the
	# time. Compiled here, not on first import: a `ray start` that compiles its dashboard on a
	# loaded machine misses Ray's fixed 30 s start-up deadline. (torch's testing helpers hold a
	# Python 3.12-only file, which Python never imports here.)
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	$(PY) -m compileall -q -j 0 -x '/torch/testing/_internal/' $(VENV)/lib/python*/site-packages > /dev/null
	touch $(STAMP)

# Debian's chromium for the explorer's browser tests (Playwright drives it; no browser downloads).
browser:
	command -v chromium || (apt-get update && apt-get install -y chromium)

run: $(STAMP)
	$(PY) jobs/build_catalog.py --config $(CONFIG)

# The text toy's quick start: a graded catalog in catalog-text/ (explore it with `hspace explore catalog-text`).
run-text: $(STAMP)
	$(PY) jobs/build_catalog.py --config configs/quickstart-text.yaml

test: $(STAMP) browser
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile --durations=25; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m pytest -q -s -rs tests/benchmarks -p no:cacheprovider

test-fast: $(STAMP) browser
	$(PY) -m pytest -q tests -m "not slow and not ray" -x -n $(TEST_WORKERS) --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check hspace pipeline jobs tests
	$(VENV)/bin/ruff format --check hspace pipeline jobs tests
	$(VENV)/bin/lint-imports  # the import contracts in pyproject.toml ([tool.importlinter])

format: $(STAMP)
	$(VENV)/bin/ruff check --fix hspace pipeline jobs tests
	$(VENV)/bin/ruff format hspace pipeline jobs tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
