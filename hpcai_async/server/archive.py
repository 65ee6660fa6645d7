"""Checkpoint downloads: a checkpoint folder streamed as a tar.gz, one chunk at a time, following no link.

Only regular files go in, each opened with ``O_NOFOLLOW`` (a link put in the folder after the store looked
at it is refused, not followed); linked folders are not entered. Chunks are ``_ARCHIVE_CHUNK`` (1 MiB) of
compressed output: small enough to stream, large enough that the per-chunk thread hop does not show."""

from __future__ import annotations

import os
import stat
import tarfile
import zlib
from collections.abc import Generator
from pathlib import Path

__all__ = ("iter_archive",)

_ARCHIVE_CHUNK = 1 << 20


def iter_archive(directory: Path, checkpoint_id: str, level: int = 6) -> Generator[bytes, None, None]:
    """``directory`` as a gzip-compressed tar, in chunks (never all of it in memory at once).

    Entries are the checkpoint's files at the top level of the archive (``adapter_model.safetensors``, …).
    """
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip header and trailer
    files = sorted(
        Path(dirpath, name)
        for dirpath, _dirs, names in os.walk(directory)  # does not enter linked folders
        for name in names
        if not os.path.islink(os.path.join(dirpath, name))
    )
    for file in files:
        name = file.relative_to(directory).as_posix()
        try:
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)  # a link put there since: refused
        except OSError:
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            continue
        info = tarfile.TarInfo(name)
        info.size = st.st_size
        info.mtime = int(st.st_mtime)
        info.mode = 0o644
        out = comp.compress(info.tobuf(format=tarfile.PAX_FORMAT))
        written = 0
        with os.fdopen(fd, "rb") as f:
            while written < info.size and (block := f.read(min(_ARCHIVE_CHUNK, info.size - written))):
                written += len(block)
                out += comp.compress(block)
                if len(out) >= _ARCHIVE_CHUNK:
                    yield out
                    out = b""
        if written != info.size:
            raise OSError(f"{name} of checkpoint {checkpoint_id} changed size while it was archived")
        out += comp.compress(b"\0" * (-info.size % tarfile.BLOCKSIZE))
        if out:
            yield out
    yield comp.compress(b"\0" * (2 * tarfile.BLOCKSIZE)) + comp.flush()
