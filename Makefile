# Two entry points for a newcomer (see README): `make pipeline` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-dev pipeline test lint bench-reader clean
install:
	scripts/install.sh
install-dev:
	scripts/install.sh dev

pipeline: install
	$(VENV)/bin/genctr pipeline

test: install-dev
	$(VENV)/bin/ruff check genctr_rec tests benchmarks launchers
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check genctr_rec tests benchmarks launchers

bench-reader: install
	$(PY) -m benchmarks.reader_throughput

clean:
	rm -rf $(VENV) runs
