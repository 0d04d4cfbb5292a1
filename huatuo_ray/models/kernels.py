"""Kernel choices every process that runs a model makes the same way.

:func:`shape_stable_attention` turns off PyTorch's cuDNN backend of
``scaled_dot_product_attention``. cuDNN builds an execution plan for every new input shape
(forward and backward), which on the H200 cost about a second each time; PyTorch prefers that
backend on Hopper GPUs. RL sees a new shape nearly every time: each rollout's prompts pad to a
different width, and HF ``generate`` attends over a longer cache at every decoding step. Measured
on the H200 (``benchmarks/RESULTS.md``, GRPO on 16 new prompts per iteration): the policy's train
step took 2.5-3.0 s with cuDNN attention and 0.18 s without, generation 2.4-3.0 s against 1.6 s.
PPO on the same 64 prompts every iteration hid it: its shapes repeat. FlashAttention and the
memory-efficient kernel have no per-shape set-up, so SDPA falls back to them.
"""

from __future__ import annotations


def shape_stable_attention() -> None:
    """Leave SDPA to kernels without a per-shape set-up (idempotent; nothing to do on CPUs)."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
