#!/usr/bin/env bash
# GPU check of the SFT path (DeepSpeed bf16, packing with the block-causal mask) on a machine that
# has PyTorch and CUDA but neither Ray nor DeepSpeed installed (the lent H100/H200 image).
# Wheels travel in .whl/ (deepspeed's sdist, built there with DS_BUILD_OPS=0, and its few
# pure-Python needs). Writes its log under $OUT (or ./outputs).
set -euo pipefail
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
out=${OUT:-outputs}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/*.whl .whl/deepspeed-*.tar.gz
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$out/gpu.txt"
# ~1.1B-parameter Llama (random weights), 2,048-token packed rows, bf16, ZeRO-2, one GPU.
python3 benchmarks/sft_throughput.py --engine-only --cuda --hidden 2048 --layers 16 --vocab 32000 \
  --max-length 2048 --micro-batch 4 --global-batch 16 --samples 1500 --warmup 3 2>&1 | tee "$out/sft_gpu.log"
