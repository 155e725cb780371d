# Two entry points for a newcomer (see README): `make pipeline` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest-xdist workers for `make test` (CI's machine has 2 cores; 0 runs the suite serially)
TEST_WORKERS ?= 2

.PHONY: install install-dev pipeline test lint bench-reader clean
install:
	scripts/install.sh
install-dev:
	scripts/install.sh dev

pipeline: install
	$(VENV)/bin/genctr pipeline

test: install-dev
	$(VENV)/bin/ruff check genctr_rec tests benchmarks launchers
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

lint: install-dev
	$(VENV)/bin/ruff check genctr_rec tests benchmarks launchers

bench-reader: install
	$(PY) -m benchmarks.reader_throughput

clean:
	rm -rf $(VENV) runs
