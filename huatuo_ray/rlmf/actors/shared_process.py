"""Several groups' workers in one process (``colocate_in_process``): veRL's hybrid worker.

By default each actor group's worker is a process of its own: policy, reference and a rollout
engine colocated on one GPU are three processes, each importing torch and transformers and
holding its own CUDA context, and the engine takes new weights by handle from another process.
With ``colocate_in_process`` the groups of one ``colocate`` list run their worker i in one Ray
actor, a :class:`SharedProcessWorker` holding one instance of each group's worker class, so a
run starts one process per bundle instead of one per group and worker (on few CPUs start-up
is mostly those processes' imports) and the engine takes the policy's weights by a copy in
memory (:meth:`SharedProcessWorker.copy_weights`, the ``in_process`` weight sync).

The driver's code does not change: each group is still an
:class:`~huatuo_ray.rlmf.actors.group.ActorGroup` whose workers are :class:`RoleHandle` s,
which turn ``worker.method.remote(*args)`` into ``role_call.remote(role, method, *args)`` on the
shared actor (``role_stream`` for generator methods, which Ray streams). The actor runs one call
at a time, in the order the driver sent them: the groups of one list take turns, as the phases
of an iteration do anyway (calls sent during a streamed rollout wait for it to finish).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any


def worker_class(path: str) -> type:
    """The class at ``"package.module:Class"``."""
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


class SharedProcessWorker:
    """Worker i of each group of one colocate list, in one process. ``roles``: (group name,
    worker class path, constructor args) in creation order; the classes are imported here, so
    the driver need not import them (and torch) to start this process."""

    def __init__(self, roles: list[tuple[str, str, tuple]]):
        self.roles = {name: worker_class(path)(*args) for name, path, args in roles}
        self.threads: dict[str, int] = {}  # each group's torch threads, set in its turn

    def role_call(self, role: str, method: str, *args: Any) -> Any:
        if method == "set_torch_threads":  # the group's own: taken on at each of its calls
            self.threads[role] = args[0]
        self._turn(role)
        return getattr(self.roles[role], method)(*args)

    def role_stream(self, role: str, method: str, *args: Any) -> Iterator[Any]:
        self._turn(role)
        yield from getattr(self.roles[role], method)(*args)

    def _turn(self, role: str) -> None:
        if role in self.threads:
            import torch

            torch.set_num_threads(self.threads[role])

    def copy_weights(self) -> dict[str, int]:
        """The ``in_process`` weight sync: the policy's trainable tensors copied into this
        process's rollout engine (gathered one at a time under ZeRO-3: every policy rank calls
        this at once); the engine's ``{"tensors", "bytes", "peak_buckets"}``."""
        return self.roles["rollout"].copy_weights_from(self.roles["policy"].trainable_tensors())


class RoleHandle:
    """Stands for one group's worker inside a :class:`SharedProcessWorker`: ``handle.m.remote``
    calls method ``m`` of that group's instance there."""

    def __init__(self, actor: Any, role: str, class_path: str):
        self.actor, self.role, self.class_path = actor, role, class_path

    def __getattr__(self, method: str) -> _RoleMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        # The class is imported here only for a method that may stream (not set_torch_threads,
        # sent as the process starts): by then this process has imported it anyway.
        streamed = method not in _PLAIN and inspect.isgeneratorfunction(
            getattr(worker_class(self.class_path), method, None)
        )
        return _RoleMethod(self, method, streamed)


_PLAIN = {"set_torch_threads", "torch_threads", "node_id", "address", "gpu_memory", "pid"}


class _RoleMethod:
    def __init__(self, handle: RoleHandle, method: str, streamed: bool):
        self.handle, self.method, self.streamed = handle, method, streamed

    def remote(self, *args: Any) -> Any:
        call = self.handle.actor.role_stream if self.streamed else self.handle.actor.role_call
        return call.remote(self.handle.role, self.method, *args)


def process_of(worker: Any) -> Any:
    """The Ray actor that runs ``worker`` (itself, or the shared process of a RoleHandle)."""
    return worker.actor if isinstance(worker, RoleHandle) else worker
