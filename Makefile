# stitch: set-up, main job and tests. Every target creates / refreshes .venv itself.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Caches stay inside the checkout (never in $HOME), so tests and CI leave nothing behind.
export STITCH_CACHE_DIR        ?= $(CURDIR)/.stitch_cache
export TRITON_CACHE_DIR        ?= $(CURDIR)/.stitch_cache/triton
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.stitch_cache/inductor

.PHONY: setup run test lint clean bench bench-quick records learned

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 first: on these machines it is the CPU wheel on local disk.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,models]" --config-settings editable_mode=compat
	@touch $(STAMP)

setup: $(STAMP)

# The client benchmark needs the bench extra (transformers, matplotlib) on top of the set-up.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev,models,bench]" --config-settings editable_mode=compat
	@touch $(BENCH_STAMP)

# The main job on the embedded default target (cpu): plan, generate, build and run bert,
# check it against eager and time it against eager and torch.compile (inductor).
run: $(STAMP)
	$(BIN)/stitchc compile --model bert --target cpu --emit ir,plan,svg -o out/bert
	$(BIN)/stitchc run --model bert --target cpu

# The tests also train the learned cost model (lightgbm) and fan tuning out over a local Ray.
TUNE_STAMP := $(VENV)/.installed-tune
$(TUNE_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev,models,tune]" --config-settings editable_mode=compat
	@touch $(TUNE_STAMP)

test: $(TUNE_STAMP)
	$(BIN)/python -m pytest -n 2 -p no:cacheprovider tests

# The learned cost model of this machine (cpu). The record set it was trained from ships
# compressed (cost_model/data/cpu_records.sqlite.xz, ~1 MB); `records` re-times the planner's
# candidates of every workload and cpu pattern into .stitch_cache/cpu_records.sqlite (resumable;
# ~20 min on 2 cores) and compresses it over the shipped one; `learned` trains the shipped model
# from the shipped records (held-out evaluation first, ~2 min).
RECORDS := $(STITCH_CACHE_DIR)/cpu_records.sqlite
records: $(TUNE_STAMP)
	$(BIN)/stitchc tune --all --target cpu --store $(RECORDS)
	xz -9 -c $(RECORDS) > cost_model/data/cpu_records.sqlite.xz

learned: $(TUNE_STAMP)
	$(BIN)/stitchc tune --train --store cost_model/data/cpu_records.sqlite.xz \
	    --out cost_model/data/cpu_learned.json

# Client models (HF, CNN, GNN, small graphs, the nine workloads) under eager / inductor / stitch:
# bench/results/clients/clients.{json,md} and the charts. bench-quick: the tiny configs (< 3 min).
BENCH_ARGS ?=
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.clients --threads 2 $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.clients --quick --threads 2 --out bench/results/clients_quick $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf out .stitch_cache .pytest_cache
