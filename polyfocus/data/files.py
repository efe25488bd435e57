"""Reading and writing the project's small files: JSON read with errors that name the file, and atomic writes; and
the check that a path-like model argument is a local directory before transformers sees it.

Every writer of a results, annotation, box or record file goes through `write_atomic`, so a crash never leaves a
half-written file where a reader (or a resumed run) would trust it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """A JSON file's value; a missing or malformed file raises `error` naming it (and the line and column)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"file not found: {os.fspath(path)}") from None
    except json.JSONDecodeError as e:
        raise error(f"{os.fspath(path)}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None


def write_atomic(path: str | os.PathLike, data: str | bytes, fsync: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (atomic on one filesystem).
    fsync: flush it to the disk first, so that the rename never lands before the data (after a power cut the file
    is whole or absent, never empty); off for files that are cheap to remake (synthworld's images)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def is_path_like(name: str | os.PathLike) -> bool:
    """`name` names a place on disk, not a model-hub id: it contains a path separator, starts with '.', '/' or '~',
    or exists. (A hub id "org/name" contains a separator too: polyfocus loads weights from local directories.)"""
    text = os.fspath(name)
    return (os.sep in text or (os.altsep or os.sep) in text or text.startswith((".", "~"))
            or os.path.exists(os.path.expanduser(text)))


def require_local(path: str | os.PathLike, what: str, directory: bool = True) -> str:
    """`path` (user-expanded) if it exists locally; FileNotFoundError naming `what` otherwise, for a path-like one.

    transformers takes a missing "runs/stage2" for a hub repo id: offline it spends tens of seconds retrying, then
    blames whatever file it looked for first. A bare name that is not a local path ("gpt2") passes unchanged."""
    text = os.fspath(path)
    if not is_path_like(text):
        return text
    expanded = os.path.expanduser(text)
    if not os.path.exists(expanded):
        raise FileNotFoundError(f"{what} {text}: no such {'directory' if directory else 'file or directory'}")
    if directory and not os.path.isdir(expanded):
        raise NotADirectoryError(f"{what} {text}: not a directory")
    return expanded


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, hex, read in 1 MiB blocks (a wheel, an ONNX file, a benchmark's data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
