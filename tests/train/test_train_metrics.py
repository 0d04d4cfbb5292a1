"""The training loop's figures by hand: a step's counts summed on the device and read once, the
split of its wall time, and the manifest's timing summary."""

from __future__ import annotations

import time

import pytest
import torch

from huatuo_ray.train.metrics import StepClock, TrainMetrics, timing_summary


def test_step_counts_are_summed_on_the_device_and_read_once_per_step() -> None:
    metrics = TrainMetrics("sft", is_rank0=False, tensorboard_dir=None, total_steps=4)
    packed = {  # two rows of 6: segments 1..3 and 1..2, zeros are padding
        "input_ids": torch.zeros(2, 6, dtype=torch.long),
        "segment_ids": torch.tensor([[1, 1, 2, 3, 3, 0], [1, 1, 1, 2, 0, 0]]),
    }
    padded = {  # not packed: rows of the attention mask
        "input_ids": torch.zeros(3, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]),
    }
    metrics.add_micro(packed, torch.tensor(2.0, requires_grad=True) * 1.0)
    metrics.add_micro(padded, torch.tensor(4.0))
    assert isinstance(metrics.sums, torch.Tensor)  # nothing read back to the host yet
    timing = {"step_s": 2.0, "data_wait_s": 0.5, "compute_s": 1.25, "other_s": 0.25}
    values = metrics.log_step(1, lr=1e-3, grad_norm=0.5, timing=timing)
    real, samples, tokens = 5 + 4 + 3 + 4 + 1, 3 + 2 + 3, 12 + 12
    assert values["loss"] == 3.0
    assert values["tokens_per_s"] == real / 2.0
    assert values["samples_per_s"] == samples / 2.0
    assert values["packing_efficiency"] == real / tokens
    assert values["grad_norm"] == 0.5 and values["lr"] == 1e-3
    assert {k: values[k] for k in timing} == timing
    assert metrics.sums is None and metrics.micro == 0  # the next step starts from zero


def test_the_step_clock_splits_wall_time_into_waiting_computing_and_the_rest() -> None:
    synced = []
    clock = StepClock(sync=lambda: synced.append(True))
    clock.waiting()
    time.sleep(0.05)  # the data loader is slow
    clock.got_batch()
    time.sleep(0.03)  # forward and backward
    assert clock.computed(step_end=False) is None and not synced
    time.sleep(0.02)  # bookkeeping between micro-batches
    clock.waiting()
    clock.got_batch()
    split = clock.computed(step_end=True)
    assert synced == [True]  # the device is waited for before the step counts as computed
    assert split["data_wait_s"] >= 0.05 and split["compute_s"] >= 0.03
    assert split["other_s"] >= 0.02
    parts = split["data_wait_s"] + split["compute_s"] + split["other_s"]
    assert parts == pytest.approx(split["step_s"], abs=1e-9)
    # The next window starts where this one ended.
    assert clock.data_wait == clock.compute == 0.0


def test_timing_summary_leaves_the_first_step_out() -> None:
    state = {
        "step_timing": [[1, 9.0, 5.0, 3.0, 1.0], [2, 1.0, 0.1, 0.8, 0.1], [3, 1.0, 0.0, 0.9, 0.1]]
    }
    summary = timing_summary(state)
    assert summary["steps_timed"] == 2 and summary["step_s"] == 2.0
    assert summary["data_wait_s"] == 0.1 and summary["compute_s"] == 1.7
    assert summary["data_wait_fraction"] == 0.05
    assert timing_summary({})["data_wait_fraction"] is None
