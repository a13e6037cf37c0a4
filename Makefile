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
	$(PY) benchmarks/bench_circular.py --batch 1
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_parc_models.py --no-sweep
	$(PY) benchmarks/bench_export.py

# The science experiments of README "Science", exactly the commands behind the committed results in
# benchmarks/results/experiments/: about 9 hours on 2 CPU cores (estimated from the committed runs' per-epoch
# seconds; half of it the three ResNet50 seeds). Finished runs in runs/cluttered_c and runs/coatnet_layouts are
# reused and unfinished ones continue, so an interrupted `make science` picks up where it stopped.
E := benchmarks/experiments
R := benchmarks/results/experiments
CLUTTERED := --seeds 1 2 3 --train-subset 10000 --test-subset 2000 --epochs 6 --threads 2 --runs runs/cluttered_c
science: setup
	$(PY) $(E)/erf_parc_vs_base.py
	$(PY) $(E)/erf_parc_vs_base.py --num-images 50 --img-size 1024 --output $(R)/erf_parc_vs_base_1024
	$(PY) $(E)/cluttered_parc_vs_base.py --pairs mobilenetv2 $(CLUTTERED)
	$(PY) $(E)/cluttered_parc_vs_base.py --pairs convnext $(CLUTTERED) --output $(R)/cluttered_parc_vs_base_convnext
	$(PY) $(E)/cluttered_parc_vs_base.py --pairs resnet50 $(CLUTTERED) --output $(R)/cluttered_parc_vs_base_resnet50
	$(PY) $(E)/erf_parc_vs_base.py --trained runs/cluttered_c --pairs convnext mobilenetv2 --img-size 448 --num-images 16 --threads 2 --output $(R)/erf_parc_vs_base_trained_448
	$(PY) $(E)/erf_parc_vs_base.py --trained runs/cluttered_c --pairs resnet50 --img-size 448 --num-images 16 --threads 2 --output $(R)/erf_parc_vs_base_trained_448_resnet50
	for s in 2 3; do $(PY) $(E)/erf_parc_vs_base.py --trained runs/cluttered_c --trained-seed $$s --pairs convnext --img-size 448 --num-images 16 --threads 2 --output $(R)/erf_parc_vs_base_trained_448_convnext_seed$$s || exit 1; done
	$(PY) $(E)/erf_parc_vs_base.py --trained runs/cluttered_c --pairs mobilenetv2 --img-size 448 --num-images 16 --threads 2 --output $(R)/erf_parc_vs_base_trained_448_mobilenetv2
	$(PY) $(E)/cam_grid.py --pairs convnext mobilenetv2 --runs runs/cluttered_c --num-images 16
	$(PY) $(E)/cam_grid.py --pairs resnet50 --runs runs/cluttered_c --num-images 16 --output $(R)/cam_grid_resnet50
	for s in 2 3; do $(PY) $(E)/cam_grid.py --pairs convnext --seed $$s --runs runs/cluttered_c --num-images 16 --output $(R)/cam_grid_convnext_seed$$s || exit 1; done
	$(PY) $(E)/cam_grid.py --pairs mobilenetv2 --runs runs/cluttered_c --num-images 16 --output $(R)/cam_grid_mobilenetv2
	$(PY) $(E)/coatnet_layouts.py --seeds 1 2 3 --train-subset 10000 --test-subset 5000 --epochs 6 --threads 1

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache
