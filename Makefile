# graceful: `make demo` runs the main job on the embedded default, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# Ray keeps token auth on (RAY_AUTH_MODE is left to the user): see deploy/CLUSTER.md

.PHONY: install demo test test-fast lint format readme-config bench-compat bench-backfill bench-stream bench-models bench-collection bench-lifelong bench-search bench-ddp clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to 2.13.0 (CPU build); an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/graceful run --dataset digits --generations 3

# --durations: CI's log names the slowest tests (CI is kept under 30 minutes)
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest --durations=20

# the fast tier: no Ray, no Prefect server or flow run, no real training, no kills
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# the README's configuration table, generated from flows/config.py (tests/unit/test_readme.py)
readme-config: install
	$(BIN)/python -m flows.config_table README.md

# the methods compared on the MLP (about 7 min on 2 cores); the residual CNN, the image
# default, is --architecture '{}' (about two hours, estimated from --quick's pace)
bench-compat: install
	$(BIN)/python -m bench.compat --architecture '{"kind": "mlp"}'

bench-backfill: install
	$(BIN)/python -m bench.backfill

bench-stream: install
	$(BIN)/python -m bench.stream

bench-collection: install
	$(BIN)/python -m bench.collection

LIFELONG_METHODS ?= none,textbook,default,bct+pct+emb/each,bct+hoc/share,bct+pct+emb+hoc/share,bct+pct+emb/emb8,default/backfill-incompatible,none/backfill-incompatible
bench-lifelong: install
	$(BIN)/python -m bench.lifelong --datasets fashion-mnist --epochs 8 --methods $(LIFELONG_METHODS)
	$(BIN)/python -m bench.lifelong --datasets digits --epochs 15 --methods $(LIFELONG_METHODS) --merge

bench-search: install
	$(BIN)/python -m bench.search

bench-models: install
	$(BIN)/python -m bench.models

bench-ddp: install
	$(BIN)/python -m bench.ddp

clean:
	rm -rf .graceful .pytest_cache
