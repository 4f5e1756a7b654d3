# flowerdiff — the commands a user types. `make train` and `make test` install first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# pytest-xdist workers for `make test` (auto: one per core; 0 runs in this process).
TEST_WORKERS ?= auto
FID_CACHE ?= $(or $(FLOWERDIFF_FID_CACHE),$(HOME)/.cache/flowerdiff/fid)

.PHONY: install train test test-fast lint format fid-weights benchmark browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev,sweep,bench,slurm,explore]"
	touch $(STAMP)

train: install fid-weights
	$(PY) scripts/train.py $(ARGS)

# Tests use tiny tensors: one BLAS/OpenMP thread per process, and one pytest worker per core,
# is faster than torch's threads inside one process (2-core AVX2 CPU: 8.6 against 15.5 minutes).
test: install fid-weights browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) $(ARGS)

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(ARGS)

lint: install
	$(PY) -m ruff check src scripts tests
	$(PY) -m ruff format --check src scripts tests

format: install
	$(PY) -m ruff check --fix src scripts tests
	$(PY) -m ruff format src scripts tests

# The browser tests (tests/test_explore.py) drive Debian's Chromium with Playwright (the dev
# extra); `playwright install` is never used. Installing chromium needs root, as CI has;
# without it the browser tests skip and say why.
browser: install
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then (apt-get update && apt-get install -y chromium) || \
		echo "make browser: apt-get could not install chromium; the browser tests will skip."; \
	else echo "make browser: /usr/bin/chromium is missing and installing it needs root" \
		"(sudo apt-get install -y chromium); the browser tests will skip."; fi

fid-weights: install
	$(PY) -m flowerdiff.metrics.weights --cache-dir $(FID_CACHE)

clean:
	rm -rf outputs multirun .pytest_cache
