# stitch: set-up, main job and tests. Every target creates / refreshes .venv itself.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Caches stay inside the checkout (never in $HOME), so tests and CI leave nothing behind.
export STITCH_CACHE_DIR        ?= $(CURDIR)/.stitch_cache
export TRITON_CACHE_DIR        ?= $(CURDIR)/.stitch_cache/triton
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.stitch_cache/inductor

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 first: on these machines it is the CPU wheel on local disk.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,models]" --config-settings editable_mode=compat
	@touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default target (cpu): plan, generate, build and run bert,
# check it against eager and time it against eager and torch.compile (inductor).
run: $(STAMP)
	$(BIN)/stitchc compile --model bert --target cpu --emit ir,plan,svg -o out/bert
	$(BIN)/stitchc run --model bert --target cpu

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf out .stitch_cache .pytest_cache
