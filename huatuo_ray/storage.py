"""Local paths and remote URIs (``s3://``, ``gs://``, ``file://``...) behind one small API.

Everything that reads or writes artifacts or input files goes through here, so a stage works the
same on a laptop and on a cluster whose storage is a bucket. pyarrow's filesystems do the work.
"""

from __future__ import annotations

import json
import posixpath
from typing import IO, Any

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    import os

    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly inside a folder, sorted by name, as URIs of the same kind as ``uri``."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return [join(uri, n) for n in names if n.endswith(suffix)]


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def open_input(uri: str) -> IO[bytes]:
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local writes go through a temporary name and a rename, so a crash
    never leaves a half-written file under the final name (object stores are atomic per put)."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = path + ".tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8"))


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (replacing what is there)."""
    if exists(uri):
        delete(uri)
    makedirs(uri)
    fs, path = resolve(uri)
    pafs.copy_files(local_dir, path, destination_filesystem=fs)


def download_dir(uri: str, local_dir: str) -> None:
    fs, path = resolve(uri)
    pafs.copy_files(path, local_dir, source_filesystem=fs)
