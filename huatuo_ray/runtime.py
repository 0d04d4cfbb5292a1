"""Connecting a stage's driver to Ray: the same code runs locally and as a submitted Ray job."""

from __future__ import annotations

import logging
import os
from typing import Any

from huatuo_ray.config import ClusterConfig
from huatuo_ray.inputs import UserError

log = logging.getLogger(__name__)

TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's controller poll (default 2 s)
LOCAL_TRAIN_POLL_S = "0.25"
# Ray Train's preemption watcher: one actor per run watching for nodes being drained (spot
# instances reclaimed). A Ray that a stage starts for itself is this one machine, never drained.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now. Another process may take it before the caller binds it:
    whoever starts a server on it checks that the server it reaches is its own, and retries
    on another port (:func:`~huatuo_ray.inference.openai_server.vllm_server`)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def connect(cluster: ClusterConfig, stage: str) -> Any:
    """``ray.init()`` for a stage. Inside ``ray job submit`` RAY_ADDRESS points at the cluster and
    this connects to it; on a laptop it starts a local Ray. Returns the Ray context."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs: dict[str, Any] = {"log_to_driver": cluster.log_to_driver}
    if cluster.address:
        kwargs["address"] = cluster.address
    starts_local = cluster.address == "local" or not (
        cluster.address or os.environ.get("RAY_ADDRESS")
    )
    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):  # the dashboard, not the cluster's GCS
        raise UserError(
            f"{address} is the dashboard's job API (for `ray job` and jobs/submit.sh); a stage run "
            "directly joins a cluster at its GCS address: cluster.address=HOST:PORT (the --port of "
            "`ray start --head`), or submit it as a job: jobs/submit.sh STAGE CONFIG"
        )
    if starts_local and cluster.num_cpus is not None:
        kwargs["num_cpus"] = cluster.num_cpus
    if starts_local:
        # Ray Train's controller takes a worker's report (each checkpoint, the end of training)
        # at its next poll, every 2 s by default: 2 s per checkpoint and at the end of a run,
        # much of a small run on one machine. A new local Ray polls every 0.25 s (the raylet
        # and every worker inherit this process's environment); a cluster keeps its own setting.
        os.environ.setdefault(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S)
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    try:
        try:
            ctx = ray.init(**kwargs)
        except ValueError as e:
            # ray.init() found a running cluster on this node (`ray start --head`): a new local
            # Ray's size does not apply there.
            if "num_cpus" not in kwargs or "existing cluster" not in str(e):
                raise
            del kwargs["num_cpus"]
            log.warning(
                "stage %s: joining the Ray cluster already running on this node; "
                "cluster.num_cpus=%s ignored (it sizes a new local Ray only)",
                stage,
                cluster.num_cpus,
            )
            ctx = ray.init(**kwargs)
    except ConnectionError as e:  # a wrong address or a cluster that is down
        where = kwargs.get("address") or os.environ.get("RAY_ADDRESS")
        raise UserError(
            f"cannot reach the Ray cluster at {where}: check cluster.address or RAY_ADDRESS ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    log.info("stage %s connected to Ray at %s", stage, ctx.address_info.get("gcs_address"))
    return ctx
