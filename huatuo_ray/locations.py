"""Where a stage's relative paths point, and where it says its output went.

``ray job submit --working-dir .`` runs the stage inside Ray's per-session copy of the project
(``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>``): a relative output
written there vanishes with the session and is shared by every later job with the same code. So
inside such a copy every relative path of the stage's config (the keys of :data:`huatuo_ray.graph.IO`
plus ``tensorboard_dir`` and ``storage_path``) resolves against a **root** that outlives the job:
the ``root=`` override, else the ``HUATUO_ROOT`` environment variable of the cluster's nodes (a
folder every node sees, or a URI). A relative input that is not under the root but ships with the
code (``huatuo_ray/demo/data/...``) is read from the copy. With no root the stage stops before any
work, in one line naming the copy and the fix. Outside a job's copy nothing changes: relative
paths are relative to the current folder.

After a stage, :func:`report` prints the absolute location of each output and, inside a submitted
job, adds it to the job's metadata (``output``, ``key_output``), which ``ray job list`` and the
dashboard's Jobs tab show.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from huatuo_ray import storage
from huatuo_ray.inputs import UserError, looks_local

log = logging.getLogger(__name__)

ROOT_ENV = "HUATUO_ROOT"
#: The part of the path of a job's working directory that Ray's runtime env gives it.
RAY_COPY = os.path.join("runtime_resources", "working_dir_files", "")
#: Paths beyond the artifact graph: written (Ray Train's storage, TensorBoard) or read (a tokenizer).
EXTRA_OUTPUTS = ("tensorboard_dir", "storage_path")
EXTRA_INPUTS = ("tokenizer_from",)


def job_copy(cwd: str | None = None) -> str | None:
    """The folder of Ray's copy of a job's working directory that ``cwd`` lies in, or None."""
    cwd = os.path.realpath(cwd or os.getcwd())
    marker = os.sep + RAY_COPY
    at = cwd.find(marker)
    if at < 0:
        return None
    package = cwd[at + len(marker) :].split(os.sep)[0]
    return cwd[: at + len(marker)] + package


def _slots(node: Any, parts: list[str]) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every value at a dotted key with ``[]`` list steps."""
    part, rest = parts[0], parts[1:]
    name = part.removesuffix("[]")
    if not dataclasses.is_dataclass(node) or not hasattr(node, name):
        return
    value = getattr(node, name)
    if part.endswith("[]"):
        for i, item in enumerate(value if isinstance(value, list) else []):
            yield from _slots(item, rest) if rest else [(value, i)]
    elif rest:
        yield from _slots(value, rest)
    else:
        yield node, name


def _get(slot: tuple[Any, Any]) -> Any:
    container, key = slot
    return container[key] if isinstance(container, list) else getattr(container, key)


def _set(slot: tuple[Any, Any], value: str) -> None:
    container, key = slot
    if isinstance(container, list):
        container[key] = value
    else:
        setattr(container, key, value)


def _relative(value: Any) -> bool:
    return (
        isinstance(value, str) and bool(value) and "://" not in value and not os.path.isabs(value)
    )


def _exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except (OSError, ValueError):  # a bucket without credentials here: cannot tell
        return False


def keys(stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input keys, output keys) of a stage's config."""
    from huatuo_ray.graph import IO

    ins, outs = IO.get(stage, ((), ()))
    return ins + EXTRA_INPUTS, outs + EXTRA_OUTPUTS


def settle(stage: str, config: Any, root: str | None = None, cwd: str | None = None) -> str | None:
    """Inside a job's copy of the working directory, point the config's relative paths under the
    root (``root`` or ``$HUATUO_ROOT``), in place; raise :class:`UserError` when some need one and
    none is set. Returns the root used (None outside a job's copy, or when nothing was relative)."""
    copy = job_copy(cwd)
    if copy is None:
        return None
    root = (root or os.environ.get(ROOT_ENV) or "").rstrip("/") or None
    ins, outs = keys(stage)
    moves: list[tuple[tuple[Any, Any], str]] = []
    homeless: list[str] = []
    here = cwd or os.getcwd()
    for kind, names in (("input", ins), ("output", outs)):
        for key in names:
            for slot in _slots(config, key.split(".")):
                path = _get(slot)
                if not _relative(path):
                    continue
                under_root = storage.join(root, path) if root else None
                if kind == "input":
                    if under_root and _exists(under_root):
                        moves.append((slot, under_root))
                        continue
                    if os.path.exists(os.path.join(here, path)):  # ships with the code
                        moves.append((slot, os.path.join(here, path)))
                        continue
                    if key.endswith("model.path") and not looks_local(path):
                        continue  # a hub id
                if under_root is None:
                    homeless.append(f"{key}={path}")
                else:
                    moves.append((slot, under_root))
    if homeless:
        raise UserError(
            f"relative path {homeless[0]} would land in Ray's temporary copy of the working "
            f"directory ({copy}), gone with the session: set {ROOT_ENV} on the cluster's nodes "
            "or pass root=/shared/folder (or s3://...), or give an absolute path or URI"
        )
    for slot, path in moves:
        _set(slot, path)
    if moves:
        log.warning("%s: relative paths resolve against %s (not Ray's copy %s)", stage, root, copy)
    return root if moves else None


def outputs(stage: str, config: Any) -> dict[str, str]:
    """The stage's output key -> absolute location (path or URI), for the graph's output keys."""
    from huatuo_ray.graph import IO

    found: dict[str, str] = {}
    for key in IO.get(stage, ((), ()))[1]:
        for slot in _slots(config, key.split(".")):
            path = _get(slot)
            if isinstance(path, str) and path:
                found[key] = path if "://" in path else os.path.abspath(path)
    return found


def report(stage: str, config: Any) -> dict[str, str]:
    """Print where the stage's outputs are, one line each (the job log's last lines), and add
    them to the submitted job's metadata. Returns them."""
    found = outputs(stage, config)
    if found:
        record_in_job(found)
    for key, location in found.items():
        print(f"{stage} {key}: {location}", flush=True)
    return found


def submission_id() -> str | None:
    """The submission id of the Ray job this driver runs as (None when not a submitted job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def record_in_job(values: dict[str, str]) -> bool:
    """Add ``values`` to the metadata of the submitted job this driver runs as. Ray has no public
    call for it: this updates the job's record in the cluster's key-value store, where the job
    manager keeps it (it reads the record back before each status change, so the metadata
    stays). Never fails the stage; returns whether it was recorded."""
    job = submission_id()
    if job is None:
        return False
    try:
        import ray
        from ray._private.ray_constants import KV_NAMESPACE_JOB
        from ray.dashboard.modules.job.common import JobInfoStorageClient
        from ray.experimental import internal_kv

        if not ray.is_initialized():
            return False
        key = JobInfoStorageClient.JOB_DATA_KEY.format(job_id=job)
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE_JOB)
        if not raw:
            return False
        info = json.loads(raw)
        info["metadata"] = {**(info.get("metadata") or {}), **values}
        internal_kv._internal_kv_put(key, json.dumps(info), namespace=KV_NAMESPACE_JOB)
        return True
    except Exception as e:  # noqa: BLE001 - the location is in the log either way
        log.info("job metadata not updated with the output location: %s", e)
        return False
