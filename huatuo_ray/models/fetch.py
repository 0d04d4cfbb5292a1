"""Model folders from URIs, fetched once per node into a local cache before anything loads them.

Hugging Face ``from_pretrained`` and vLLM read a local folder or a hub id; a model artifact in
object storage (``s3://``, ``gs://``, or any pyarrow filesystem URI, ``file://`` included) is
copied here first. :func:`local_model_path` is called wherever a model path is resolved: a local
path or a hub id comes back unchanged, a URI comes back as its folder in the cache.

The cache (``$HUATUO_MODEL_CACHE``, else ``~/.cache/huatuo/models``) holds one folder per URI.
A copy is complete when its ``.huatuo-fetch.json`` exists: the source URI and, per file, its size
and the sha256 of the bytes read from the source, computed while they were copied and checked
against the written file before the copy is published (a temporary folder renamed into place).
A later call on the same node lists the source and compares it with that manifest (names and
sizes) and with the cached files: equal, the cached folder is used without copying; otherwise it
is fetched again. Actors starting together on one node wait on a file lock, so the folder is
fetched once per node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator

import pyarrow.fs as pafs

from huatuo_ray import storage

log = logging.getLogger(__name__)
FETCH_MANIFEST = ".huatuo-fetch.json"
CHUNK = 8 << 20


class FetchError(RuntimeError):
    """A model folder that could not be fetched or did not arrive intact."""


def cache_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "huatuo", "models")
    return os.environ.get("HUATUO_MODEL_CACHE") or default


def is_remote(path: str) -> bool:
    return "://" in path


def local_model_path(path: str, cache_dir: str | None = None) -> str:
    """A folder on this node holding the model at ``path`` (fetched once if it is a URI)."""
    if not is_remote(path):
        return path
    root = cache_dir or cache_root()
    key = hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
    name = posixpath.basename(path.rstrip("/")) or "model"
    target = os.path.join(root, f"{name}-{key}")
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, f"{name}-{key}.lock")):
        listing = _listing(path)
        if _is_current(target, listing):
            return target
        log.info("fetching %s (%d files, %.1f MB) to %s", path, len(listing),
                 sum(listing.values()) / 1e6, target)  # fmt: skip
        _fetch(path, listing, target)
    return target


@contextlib.contextmanager
def _locked(lock_path: str) -> Iterator[None]:
    import fcntl

    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _listing(uri: str) -> dict[str, int]:
    """Relative path -> size of every file under the source folder."""
    fs, base = storage.resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (OSError, ValueError) as e:
        raise FetchError(f"cannot list model folder {uri}: {e}") from e
    files = {posixpath.relpath(i.path, base): i.size for i in infos if i.type == pafs.FileType.File}
    if not files:
        raise FetchError(f"model folder {uri} is empty or missing")
    return files


def _is_current(target: str, listing: dict[str, int]) -> bool:
    try:
        with open(os.path.join(target, FETCH_MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    files = manifest.get("files", {})
    if {k: v["size"] for k, v in files.items()} != listing:
        return False  # the source changed since it was fetched
    return all(_size(os.path.join(target, rel)) == entry["size"] for rel, entry in files.items())


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _copy_hashed(fs: pafs.FileSystem, src: str, dst: str) -> str:
    digest = hashlib.sha256()
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with fs.open_input_stream(src) as f, open(dst, "wb") as out:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(uri: str, listing: dict[str, int], target: str) -> None:
    fs, base = storage.resolve(uri)
    staging = tempfile.mkdtemp(prefix=".fetch-", dir=os.path.dirname(target))
    try:
        files = {}
        for rel, size in sorted(listing.items()):
            local = os.path.join(staging, rel)
            sha = _copy_hashed(fs, posixpath.join(base, rel), local)
            if _size(local) != size or file_sha256(local) != sha:
                raise FetchError(f"{uri}/{rel}: the copy does not match the source")
            files[rel] = {"size": size, "sha256": sha}
        with open(os.path.join(staging, FETCH_MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"source": uri, "files": files}, f, indent=1, sort_keys=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify(folder: str) -> list[str]:
    """Files of a fetched folder whose sha256 differs from its manifest (empty: intact)."""
    with open(os.path.join(folder, FETCH_MANIFEST), encoding="utf-8") as f:
        files = json.load(f)["files"]
    return sorted(
        rel
        for rel, entry in files.items()
        if _size(os.path.join(folder, rel)) != entry["size"]
        or file_sha256(os.path.join(folder, rel)) != entry["sha256"]
    )


def fetched_model(model):
    """A ModelConfig whose path is a folder on this node (see :func:`local_model_path`)."""
    import dataclasses

    return dataclasses.replace(model, path=local_model_path(model.path))
