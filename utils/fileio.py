"""File helpers for every layer: atomic writes of files and folders, JSON, checksums, and the
few file operations the rest uses, on any tf.io.gfile filesystem.

A file (or folder) appears under its final name only when complete: it is written to a temporary
name in the same folder, flushed to disk, then renamed. A killed run leaves at most a `.tmp-*`
file (or folder) behind.

Paths with a scheme (`gs://...`, `ram://...`, `s3://...`: anything `tf.io.gfile` speaks) go through
tf.io.gfile; plain paths keep the os calls. On an object store a rename is a copy and a delete, not
atomic, so there a file is written once under its final name, complete: its bytes are gathered in
memory and written in one piece (a single-object upload appears whole or not at all). gfile's
errors are raised as OSError (FileNotFoundError when missing), as the os calls would.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import IO, Iterator

from utils.errors import first_line


def is_local(path: str) -> bool:
    """A plain path of this machine (no `scheme://`): the os calls and memory-mapping apply."""
    return "://" not in path


@contextlib.contextmanager
def _os_errors(path: str) -> Iterator[None]:
    import tensorflow as tf
    try:
        yield
    except tf.errors.NotFoundError as e:
        raise FileNotFoundError(f"{path}: {first_line(e)}") from None
    except tf.errors.OpError as e:
        raise OSError(f"{path}: {first_line(e)}") from None


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(path)
    with _os_errors(path):
        return _gfile().exists(path)


def exists_or_prefix(path: str) -> bool:
    """A file or folder at `path`, or files named `path.*` (a TF checkpoint's prefix)."""
    if exists(path):
        return True
    folder, base = os.path.split(path)
    return isdir(folder or ".") and any(f.startswith(base + ".") for f in listdir(folder or "."))


def isdir(path: str) -> bool:
    if is_local(path):
        return os.path.isdir(path)
    with _os_errors(path):
        return _gfile().isdir(path)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        with _os_errors(path):
            _gfile().makedirs(path)


def listdir(path: str) -> list[str]:
    if is_local(path):
        return os.listdir(path)
    with _os_errors(path):
        return [n.rstrip("/") for n in _gfile().listdir(path)]


def getsize(path: str) -> int:
    if is_local(path):
        return os.path.getsize(path)
    with _os_errors(path):
        return _gfile().stat(path).length


def remove(path: str) -> None:
    if is_local(path):
        os.remove(path)
    else:
        with _os_errors(path):
            _gfile().remove(path)


def rmtree(path: str) -> None:
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif exists(path):
        with _os_errors(path):
            _gfile().rmtree(path)


def read_bytes(path: str) -> bytes:
    if is_local(path):
        with open(path, "rb") as f:
            return f.read()
    with _os_errors(path):
        with _gfile().GFile(path, "rb") as f:
            return f.read()


@contextlib.contextmanager
def open_read(path: str, mode: str = "rb") -> Iterator[IO]:
    """A file opened for reading (streamed: gfile reads on demand)."""
    if is_local(path):
        with open(path, mode) as f:
            yield f
        return
    with _os_errors(path):
        f = _gfile().GFile(path, mode)
        try:
            yield f
        finally:
            f.close()


def append_line(path: str, line: str) -> None:
    """Append a line of text. Object stores cannot append: there the file is rewritten whole
    (atomically), fine for the small logs this serves."""
    if is_local(path):
        with open(path, "a") as f:
            f.write(line + "\n")
        return
    old = read_bytes(path).decode() if exists(path) else ""
    with atomic_write(path, "w") as f:
        f.write(old + line + "\n")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file in one piece (on an object store: one upload, appearing complete)."""
    if is_local(path):
        with atomic_write(path) as f:
            f.write(data)
        return
    with _os_errors(path):
        if path.startswith("ram://") and _gfile().exists(path):
            _gfile().remove(path)  # ram:// opened "wb" appends to an existing file (TF 2.21)
        with _gfile().GFile(path, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    if not is_local(path):  # gathered in memory, then one write under the final name
        buf = io.BytesIO() if "b" in mode else io.StringIO()
        yield buf
        data = buf.getvalue()
        write_bytes(path, data if isinstance(data, bytes) else data.encode())
        return
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{base}-")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str, replace: bool = False) -> Iterator[str]:
    """A folder written in full or not at all: yields a temporary sibling, renamed to `path` on
    success, removed on failure. `path` must be absent or an empty folder, unless `replace`: then
    an existing `path` is swapped out after the new folder is complete (two renames)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        if replace and os.path.exists(path):
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)  # replaces an empty folder; fails on a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str, error: type[Exception] | None = None, what: str = "") -> dict:
    """A JSON file; with `error`, an unreadable or invalid file raises error("PATH: unreadable
    WHAT (why)") instead of the library's own exception."""
    if error is None:
        return json.loads(read_bytes(path))
    try:
        return json.loads(read_bytes(path))
    except (OSError, ValueError) as e:
        why = "not valid JSON" if isinstance(e, ValueError) else (e.strerror or "cannot be read")
        raise error(f"{path}: unreadable {what + ' ' if what else ''}({why})") from None


def write_json(path: str, obj: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
