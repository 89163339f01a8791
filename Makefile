# ftpipe developer commands. `make setup` builds .venv/ in the repo with everything (CPU torch pinned).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_PY ?= python3
BENCH_ARGS ?=

.PHONY: help setup demo test test-full lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv/ with ftpipe and its dependencies (CPU torch)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,qlora,deepspeed,sweep]"  # DeepSpeed compiles its ops on first use
	touch $@

demo: setup  ## fine-tune SmolLM2-135M on colour names with LoRA, on the CPU, end to end
	$(VENV)/bin/ftpipe +recipe=colorist_lora

# Two workers of one thread each (a file's tests stay on one worker): on 2 cores this beats one worker of two
# threads, and more threads than cores make torch's OpenMP threads spin against each other.
TEST_WORKERS ?= 2
test: setup  ## the default suite: tiny models, launchers, faults, one SmolLM2 run (~15 min on 2 cores; no network but PyPI)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-full: setup $(VENV)/.installed-full  ## everything, adding the colorist demo run on SmolLM2 and llama.cpp (~9 min more)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# What only the slow tests use: llama-cpp-python (builds llama.cpp from source with cmake, ~15 min once on
# one core) to run the exported GGUF, and Go (root's apt) to render Modelfile TEMPLATEs as Ollama does.
$(VENV)/.installed-full: $(VENV)/.installed
	-command -v go >/dev/null || (apt-get update -qq && apt-get install -y -qq golang-go)
	$(PY) -m pip install -q -e ".[llamacpp]"
	touch $@

lint: setup  ## ruff
	$(VENV)/bin/ruff check ftpipe tests scripts
	$(VENV)/bin/ruff format --check ftpipe tests scripts

bench:  ## GPU speed benchmark: HF+PEFT vs ftpipe, side by side (GPU machine; its own python3, BENCH_ARGS=...)
	$(BENCH_PY) scripts/bench.py $(BENCH_ARGS)

clean:  ## remove build leftovers (not the cache)
	rm -rf build dist *.egg-info outputs multirun
