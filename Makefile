# Two commands a newcomer needs: `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench demo

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

run: $(BIN)/.installed
	$(BIN)/python cli.py demo data/demo-bundle
	$(BIN)/python cli.py reconcile data/demo-bundle --output data/demo-anomalies.csv

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_reconcile.py
