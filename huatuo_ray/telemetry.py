"""Stage metrics for the Ray dashboard (``ray.util.metrics``: Prometheus/Grafana) and the terminal.

Metric names start with ``huatuo_`` (Prometheus shows them as ``ray_huatuo_...``); every metric
carries a ``stage`` tag and a ``job`` tag (the Ray job id of the Jobs tab) so one dashboard panel can
show all stages and runs. Created lazily, once per process: they only work inside a Ray worker or
driver. ``cluster/grafana/huatuo.json`` is the Grafana dashboard of these series.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

_METRICS: dict[str, Any] = {}  # (kind, name, tag names) -> this process's metric object


def _job() -> str:
    import ray

    return ray.get_runtime_context().get_job_id() or ""


def _metric(kind: str, name: str, tags: dict[str, str]) -> Any:
    """This process's ``ray.util.metrics.<kind>`` (Counter, Gauge) ``huatuo_<name>`` with the tag
    names of ``tags``, made on first use."""
    from ray.util import metrics

    key = f"{kind}:{name}:" + ",".join(sorted(tags))
    if key not in _METRICS:
        _METRICS[key] = getattr(metrics, kind)(
            f"huatuo_{name}",
            description=name.replace("_", " "),
            tag_keys=("stage", "job", *sorted(tags)),
        )
    return _METRICS[key]


def count(name: str, value: float, stage: str, **tags: str) -> None:
    """Add ``value`` to counter ``huatuo_<name>``; a no-op outside Ray."""
    if value <= 0:
        return
    try:
        _metric("Counter", name, tags).inc(value, tags={"stage": stage, "job": _job(), **tags})
    except Exception as e:  # noqa: BLE001 - metrics must never stop a stage
        log.debug("metric %s not recorded: %s", name, e)


def gauge(name: str, value: float, stage: str, **tags: str) -> None:
    """Set gauge ``huatuo_<name>``; a no-op outside Ray."""
    try:
        _metric("Gauge", name, tags).set(value, tags={"stage": stage, "job": _job(), **tags})
    except Exception as e:  # noqa: BLE001 - metrics must never stop a stage
        log.debug("metric %s not recorded: %s", name, e)


class Progress:
    """Done/failed counts with rate and ETA, logged every ``every`` seconds and exported."""

    def __init__(self, stage: str, total: int, every: float = 10.0):
        self.stage, self.total, self.every = stage, total, every
        self.done = self.failed = 0
        self.started = self._last = time.time()

    def update(self, ok: bool) -> None:
        self.done += ok
        self.failed += not ok
        now = time.time()
        if now - self._last >= self.every or self.done + self.failed == self.total:
            self._last = now
            n = self.done + self.failed
            rate = n / max(now - self.started, 1e-9)
            eta = (self.total - n) / rate if rate else float("inf")
            log.info(
                "%s: %d/%d records (%d failed), %.1f/s, ETA %.0fs",
                self.stage, n, self.total, self.failed, rate, eta,
            )  # fmt: skip
            gauge("progress_fraction", n / max(self.total, 1), self.stage)
