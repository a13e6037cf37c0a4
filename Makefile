# The README's two commands: `make demo` and `make test`. Everything goes through .venv.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m hybridvision demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_circular.py
	@if [ -f benchmarks/bench_models.py ]; then $(PY) benchmarks/bench_models.py; fi

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache
