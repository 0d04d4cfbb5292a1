"""Bucketed weight sync over a real gloo group (sender and receiver in two threads): the weights
arrive intact, and the receiving side never holds more than one bucket, measured by the meter
that watches each bucket's lifetime (and which does see a receiver that keeps them all)."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from huatuo_ray.rlmf import weight_sync as ws
from huatuo_ray.runtime import free_port


def _specs(named: list[tuple[str, torch.Tensor]]) -> list[ws.ParamSpec]:
    return [ws.ParamSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in named]


def test_buckets_by_hand() -> None:
    specs = [
        ws.ParamSpec("a", "float32", (4,)),  # 16 bytes
        ws.ParamSpec("b", "float32", (2, 2)),  # 16
        ws.ParamSpec("c", "float32", (10,)),  # 40: larger than a bucket, alone
        ws.ParamSpec("d", "float16", (4,)),  # 8: another dtype, another bucket
        ws.ParamSpec("e", "float16", (4,)),  # 8
    ]
    assert specs[2].nbytes == 40 and specs[3].nbytes == 8
    assert ws.plan_buckets(specs, 32) == [[0, 1], [2], [3, 4]]
    assert ws.plan_buckets(specs, 8) == [[0], [1], [2], [3], [4]]
    assert ws.plan_buckets(specs, 10**9) == [[0, 1, 2], [3, 4]]


def _sync(named, bucket_bytes: int, consume) -> tuple[ws.BucketMeter, object]:
    """Send ``named`` from one thread; ``consume(stream)`` the receiving stream in another."""
    port = free_port()
    specs = _specs(named)
    meter = ws.BucketMeter()
    result: dict = {}

    def send() -> None:
        group = ws.join_group("127.0.0.1", port, 0, 2, "gloo")
        result["sent"] = ws.send_buckets(group, (t for _, t in named), specs, bucket_bytes, "cpu")

    def receive() -> None:
        group = ws.join_group("127.0.0.1", port, 1, 2, "gloo")
        copy = result.get("copy", False)
        stream = ws.receive_buckets(group, specs, bucket_bytes, "cpu", meter, copy=copy)
        result["out"] = consume(stream)

    threads = [threading.Thread(target=send), threading.Thread(target=receive)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert result["sent"] == sum(t.numel() * t.element_size() for _, t in named)
    return meter, result["out"]


def test_the_receiver_holds_one_bucket_and_the_weights_arrive(tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    named = [(n, p.detach()) for n, p in source.named_parameters()]
    total = sum(t.numel() * t.element_size() for _, t in named)
    bucket = total // 5  # several buckets, several tensors in most

    meter, count = _sync(named, bucket, lambda stream: ws.copy_into(target, stream))
    assert count == len(named) and meter.tensors == len(named)
    for (name, p), q in zip(named, target.parameters()):
        assert torch.equal(p, q), name
    assert meter.bytes == total
    buckets = len(ws.plan_buckets(_specs(named), bucket))
    assert buckets >= 3 and meter.peak == 1 and meter.live == 0


def test_the_meter_sees_a_receiver_that_keeps_buckets() -> None:
    named = [(f"w{i}", torch.full((8,), float(i))) for i in range(6)]
    # Keeping the views (a list of the whole update) keeps every bucket alive: 3 at once.
    meter, kept = _sync(named, 64, list)
    assert meter.peak == 3 and [float(t[0]) for _, t in kept] == [0, 1, 2, 3, 4, 5]


def test_copies_free_the_bucket_for_consumers_that_keep_tensors() -> None:
    """vLLM buffers a layer's tensors until the layer is complete: it gets copies, so the
    bucket is released at once."""
    named = [(f"w{i}", torch.full((8,), float(i))) for i in range(6)]
    port = free_port()
    specs = _specs(named)
    meter = ws.BucketMeter()
    kept: list = []

    def send() -> None:
        group = ws.join_group("127.0.0.1", port, 0, 2, "gloo")
        ws.send_buckets(group, (t for _, t in named), specs, 64, "cpu")

    thread = threading.Thread(target=send)
    thread.start()
    group = ws.join_group("127.0.0.1", port, 1, 2, "gloo")
    kept = list(ws.receive_buckets(group, specs, 64, "cpu", meter, copy=True))
    thread.join(timeout=60)
    assert meter.peak == 1 and [float(t[0]) for _, t in kept] == [0, 1, 2, 3, 4, 5]


def test_partial_reload_warnings_are_silenced(caplog: pytest.LogCaptureFixture) -> None:
    ws.quiet_partial_reload()
    ws.quiet_partial_reload()  # idempotent
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    assert sum(isinstance(f, ws._PartialReloadFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("%s: Failed to load weights", "LlamaDecoderLayer")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
