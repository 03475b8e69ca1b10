# Quickstart: `make demo` pretrains a small backbone, trains Conditional DETR and DETR on the built-in synthetic
# data and compares them; `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo docs-example test lint format bench bench-peers slurm-up slurm-down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, pinned to the builds on this machine's disk; a range in pyproject keeps others free.
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q "torch>=2.4" "torchvision>=0.19"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m conddetr demo

# docs/predictions_example.png from the demo run (run `make demo` first): `predict` on its synthetic val images.
docs-example: $(STAMP)
	PY=$(BIN)/python bash scripts/docs_example.sh runs/demo_synthetic

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Peer benchmarks needing optional packages have their own targets (bench_peers: HF transformers, `.[bench]`).
bench: $(STAMP)
	for f in benchmarks/bench_*.py; do [ $$f = benchmarks/bench_peers.py ] && continue; \
		echo "== $$f"; $(BIN)/python $$f || exit 1; done

# Ours vs HF transformers, same process, same glibc malloc settings for both (bench_allocator.py measures those).
# Options through ARGS, e.g. `make bench-peers ARGS="--repeats 3"`.
bench-peers: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 $(BIN)/python benchmarks/bench_peers.py $(ARGS)

slurm-up:
	bash scripts/slurm_cluster.sh up

slurm-down:
	bash scripts/slurm_cluster.sh down

clean:
	rm -rf $(VENV) runs .pytest_cache
