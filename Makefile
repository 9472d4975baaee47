# Two commands a newcomer needs: `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint bench demo-cli up

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# The app on the embedded SQLite under ./data/; the first start migrates and loads the demo org
# (`db prepare` does it before the server starts; `streamlit run app.py` alone does it too).
run: $(BIN)/.installed
	$(BIN)/python cli.py db prepare
	$(BIN)/streamlit run app.py

# ruff, and lint-imports: the layout's one-way flow as contracts (pyproject.toml [tool.importlinter]).
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Everything CI runs: lint, then every test (PostgreSQL, browser and slow ones included), one worker per
# core (pytest-xdist): each test has its own database, data folder and ports.
test: lint
	$(BIN)/pytest -q -n auto

# The quick loop while coding: skips tests marked slow or browser.
test-fast: $(BIN)/.installed
	$(BIN)/pytest -q -m "not slow and not browser"

# app + api + scheduler against DATABASE_URL (see docs/deploy.md and .env.example).
up: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start

# The engine end to end without the app: demo bundle -> reconcile -> anomalies CSV + summary.
demo-cli: $(BIN)/.installed
	$(BIN)/python cli.py demo data/demo-bundle
	$(BIN)/python cli.py reconcile data/demo-bundle --output data/demo-anomalies.csv

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_reconcile.py
	$(BIN)/python bench/bench_pages.py
	$(BIN)/python bench/bench_ingest.py
