"""A model folder as an OpenAI-compatible endpoint, served by a Ray actor wherever Ray places it.

For stages that need a model as an endpoint for the length of a run (``consult``'s doctor). The
actor asks for the resources of :class:`ModelServerConfig` (CPUs, GPUs, custom resources that pick
a node), starts the asynchronous engine with the configured dtype, memory share and eager mode,
and serves :func:`~huatuo_ray.inference.openai_api.openai_app` with uvicorn on its node's address
(``ray.util.get_node_ip_address()``), so the stage's workers reach it from any node.

    with model_endpoint("/models/ppo", "ppo", ModelServerConfig(num_gpus=1)) as served:
        client = openai.OpenAI(base_url=served.base_url, api_key="unused")

The endpoint checks no key: it lives inside the cluster's network for one run and is stopped
when the block ends (engine shut down, actor killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from huatuo_ray.config import option
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.inference.openai_api import ChatLimits


@dataclass
class ModelServerConfig:
    """A model served by a Ray actor for the length of a stage."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    num_cpus: float = option(1.0, help="CPUs the serving actor asks for")
    num_gpus: float = option(0.0, help="GPUs the serving actor asks for (vLLM: its TP size)")
    resources: dict[str, float] = option(
        {}, help="custom Ray resources the actor asks for, e.g. {doctor_node: 1} to pick a node"
    )
    limits: ChatLimits = field(default_factory=ChatLimits)
    start_timeout_s: float = option(900.0, help="time to load the model and answer")


@dataclass
class Served:
    """Where the model answers."""

    base_url: str
    node_id: str
    node_ip: str

    def to_dict(self) -> dict[str, str]:
        return {"base_url": self.base_url, "node_id": self.node_id, "node_ip": self.node_ip}


class ModelServer:
    """Ray actor (async): one engine and its HTTP server on this node's address."""

    async def start(self, model_path: str, name: str, engine: EngineConfig,
                    limits: ChatLimits) -> Served:  # fmt: skip
        import ray
        import uvicorn
        from transformers import AutoTokenizer

        from huatuo_ray.inference.engines import context_length, make_async_engine
        from huatuo_ray.inference.openai_api import ChatService, openai_app

        self.engine = make_async_engine(model_path, engine)
        service = ChatService(self.engine, AutoTokenizer.from_pretrained(model_path), name,
                              limits, None, context_length(model_path, engine), "model_server",
                              ray.get_runtime_context().get_actor_id())  # fmt: skip
        ip = ray.util.get_node_ip_address()
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, 0))
        self.server = uvicorn.Server(uvicorn.Config(openai_app(service), log_level="warning"))
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
            await asyncio.sleep(0.05)
        host = f"[{ip}]" if ":" in ip else ip
        port = sock.getsockname()[1]
        return Served(f"http://{host}:{port}/v1", ray.get_runtime_context().get_node_id(), ip)

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 30)
        self.engine.shutdown()


@contextlib.contextmanager
def model_endpoint(model_path: str, name: str, config: ModelServerConfig) -> Iterator[Served]:
    """Start :class:`ModelServer` on ``model_path`` where its resources fit; yield where it
    answers; stop it (engine shut down, actor killed) when the block ends."""
    import ray

    actor = (
        ray.remote(ModelServer)
        .options(
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            resources=dict(config.resources) or None,
        )
        .remote()
    )  # fmt: skip
    try:
        served = ray.get(actor.start.remote(model_path, name, config.engine, config.limits),
                         timeout=config.start_timeout_s)  # fmt: skip
        yield served
    finally:
        with contextlib.suppress(Exception):
            ray.get(actor.stop.remote(), timeout=60)
        ray.kill(actor)
