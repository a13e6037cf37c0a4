# The README's two commands: `make demo` and `make test`. Everything goes through .venv.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench science clean

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
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_parc_models.py --no-sweep
	$(PY) benchmarks/bench_export.py

# The science experiments of README "Science" at their committed (small, CPU) budgets.
science: setup
	$(PY) benchmarks/experiments/erf_parc_vs_base.py
	$(PY) benchmarks/experiments/cluttered_parc_vs_base.py --pairs mobilenetv2 --train-subset 2000 --test-subset 1000 --epochs 4 --batch-size 32 --runs runs/cluttered_b
	$(PY) benchmarks/experiments/coatnet_layouts.py --train-subset 5000 --test-subset 2000 --epochs 2
	$(PY) benchmarks/experiments/cam_grid.py --pairs mobilenetv2 --runs runs/cluttered_b

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache
