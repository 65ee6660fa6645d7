"""The store's file-system primitives: the store lock, link checks, reads that follow no link, atomic writes.

``store.py`` builds the layout of runs and checkpoints on these; nothing here knows that layout.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import msgspec

__all__ = (
    "fsync_dir",
    "fsync_tree",
    "holds_link",
    "is_real",
    "lock_store",
    "read_file",
    "write_json_atomic",
)

_encoder = msgspec.json.Encoder()


def lock_store(path: Path) -> int:
    """Take the store's lock (held until the returned descriptor closes), or say who holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(
            f"the store {path.parent} is in use by another server (pid {holder}): one server per store; "
            "stop that server, or start this one with another --store"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def is_real(path: Path) -> bool:
    """``path`` (under the resolved store root) is reached without following any link."""
    return path.resolve() == path and not path.is_symlink()


def holds_link(directory: Path) -> str | None:
    """The first link inside ``directory`` (relative name), or None; links are listed, never followed."""
    for dirpath, dirs, files in os.walk(directory):
        for name in dirs + files:
            if os.path.islink(os.path.join(dirpath, name)):
                return os.path.relpath(os.path.join(dirpath, name), directory)
    return None


def read_file(path: Path) -> bytes:
    """The bytes of a regular file, refusing a link (``O_NOFOLLOW``: no race between check and open)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: object) -> None:
    """``obj`` as JSON at ``path``: written to a temporary name, fsynced, then ``os.replace``-d."""
    data = msgspec.json.format(_encoder.encode(obj), indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
