# dw-d2 entry points. Every target installs what it needs first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/Builtin/dw_lite0_FPN_shapes.yaml
OUTPUT ?= output/shapes_dw

.PHONY: setup run test test-fast bench compare check-data env clean

setup:
	@bash tools/setup_env.sh

# The main job: fine-tune DW (box refinement on) from ImageNet weights on the built-in dataset,
# then COCO-evaluate it.
run: setup
	$(PY) train_net.py --config-file $(CONFIG) OUTPUT_DIR $(OUTPUT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) tools/benchmark.py $(BENCH_ARGS)

compare: setup
	$(PY) tools/compare.py $(COMPARE_ARGS)

# Run the dataset checks of training without training, print a summary and write its picture:
#   make check-data CONFIG=configs/... DATASETS="my_train my_val" OPTS="MODEL.DW.NUM_CLASSES 3"
check-data: setup
	$(PY) -m dw_d2.check_dataset --config-file $(CONFIG) $(addprefix --dataset=,$(DATASETS)) $(OPTS)

env: setup
	$(PY) -m dw_d2.env

clean:
	rm -rf output .pytest_cache .hypothesis
