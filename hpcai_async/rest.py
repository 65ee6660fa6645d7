"""RestClient: training runs and checkpoints (list, show, delete, download), and the checkpoint-path parser.

An archive is streamed to disk when a destination is given: to a temporary file beside it, renamed into place
once complete, so a failed download leaves nothing half-written behind. Without one it is returned as bytes
(the official SDK's form), refused above a size cap.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import quote

from . import _wire
from ._errors import ConfigurationError
from ._http import Request, Transport
from ._loop import LoopBinding, future, on_client_loop
from ._progress import ProgressBar
from ._wire import ParsedCheckpointPath
from .types import CheckpointsListResponse, TrainingRun, TrainingRunsResponse

__all__ = (
    "MAX_ARCHIVE_BYTES",
    "ParsedCheckpointPath",
    "ProgressCallback",
    "RestClient",
    "parse_checkpoint_path",
)

ProgressCallback = Callable[[int, int | None], None]
"""Called as ``progress(bytes_written, total_bytes_or_None)`` while an archive downloads."""

MAX_ARCHIVE_BYTES = 2 << 30  # what download_checkpoint_archive holds in memory at most (no destination)


def parse_checkpoint_path(path: str) -> ParsedCheckpointPath:
    """Split ``hpcai://{run}/{weights|sampler_weights|training|sampler}/{checkpoint_id}`` into its parts.

    ``tinker://`` paths are read the same way; a path that is neither raises ``ConfigurationError``.
    """
    return _wire.parse_checkpoint_path(path)


def _segment(value: str) -> str:
    return quote(value, safe="")


class RestClient:
    """Training runs and their checkpoints. Get one from ``ServiceClient.create_rest_client()``.

    Each method is a coroutine ``x_async`` and a plain ``x`` that returns an ``APIFuture``.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @property
    def _binding(self) -> LoopBinding:
        return self._transport.binding

    # ----------------------------------------------------------------------------------------- runs

    @on_client_loop
    async def list_training_runs_async(self, limit: int = 20, offset: int = 0) -> TrainingRunsResponse:
        """One page of training runs, newest first, with the cursor (offset, limit, total_count)."""
        params = {"limit": limit, "offset": offset}
        return await self._transport.request("GET", "training_runs", TrainingRunsResponse, params=params)

    list_training_runs = future(list_training_runs_async)

    @on_client_loop
    async def get_training_run_async(self, training_run_id: str) -> TrainingRun:
        """One training run: base model, LoRA rank, last checkpoints."""
        return await self._transport.request("GET", f"training_runs/{_segment(training_run_id)}", TrainingRun)

    get_training_run = future(get_training_run_async)

    @on_client_loop
    async def get_training_run_by_checkpoint_path_async(self, checkpoint_path: str) -> TrainingRun:
        """The training run a checkpoint path (``hpcai://...``) belongs to."""
        return await self.get_training_run_async(parse_checkpoint_path(checkpoint_path).training_run_id)

    get_training_run_by_checkpoint_path = future(get_training_run_by_checkpoint_path_async)

    # ----------------------------------------------------------------------------------------- checkpoints

    @on_client_loop
    async def list_checkpoints_async(self, training_run_id: str) -> CheckpointsListResponse:
        """The training and sampler checkpoints of a run, newest first (the reference output's order)."""
        path = f"training_runs/{_segment(training_run_id)}/checkpoints"
        listed = await self._transport.request("GET", path, CheckpointsListResponse)
        listed.checkpoints.sort(key=lambda c: c.time, reverse=True)  # stable: equal times keep their order
        return listed

    list_checkpoints = future(list_checkpoints_async)

    @on_client_loop
    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        """Delete one checkpoint of a run."""
        path = f"training_runs/{_segment(training_run_id)}/checkpoints/{_segment(checkpoint_id)}"
        await self._transport.call("DELETE", path)

    delete_checkpoint = future(delete_checkpoint_async)

    @on_client_loop
    async def delete_checkpoint_by_checkpoint_path_async(self, checkpoint_path: str) -> None:
        """Delete the checkpoint at ``hpcai://...``."""
        parsed = parse_checkpoint_path(checkpoint_path)
        await self.delete_checkpoint_async(parsed.training_run_id, parsed.checkpoint_id)

    delete_checkpoint_by_checkpoint_path = future(delete_checkpoint_by_checkpoint_path_async)

    @on_client_loop
    async def download_checkpoint_archive_async(
        self,
        training_run_id: str,
        checkpoint_id: str,
        destination: str | os.PathLike[str] | None = None,
        *,
        progress: ProgressCallback | None = None,
        show_progress: bool = False,
        max_bytes: int = MAX_ARCHIVE_BYTES,
    ) -> bytes | Path:
        """A checkpoint's ``.tar.gz`` archive: its bytes, or streamed to ``destination`` (returns the path).

        Without ``destination`` the archive's bytes are returned, as the official SDK does; an archive over
        ``max_bytes`` (default 2 GiB) raises ``ConfigurationError`` as soon as that is known, instead of
        filling memory: pass a ``destination`` to stream it to disk. ``destination`` is a file or an existing
        folder (there the file is ``{run}_{checkpoint}.tar.gz``); it is written beside the target and renamed
        into place once complete. ``progress(bytes_so_far, total_or_None)`` is called as the data arrives;
        ``show_progress`` draws a progress bar on stderr.
        """
        path = f"training_runs/{_segment(training_run_id)}/checkpoints/{_segment(checkpoint_id)}/archive"
        label = f"{training_run_id}_{checkpoint_id}.tar.gz".replace("/", "_")
        bar = ProgressBar(label, sys.stderr) if show_progress else None  # asked for: drawn on any stream
        try:
            if destination is None:
                sink: _Sink = _MemorySink(max_bytes, path)
            else:
                sink = _FileSink(Path(destination), label)
            counted = _counting(sink, progress, bar)
            request = Request("GET", path, headers={"Accept": _wire.GZIP}, sink=counted)
            try:
                await self._transport.retrying(request, self._transport.retry.budget(f"GET {path}"))
                return sink.finish()
            finally:
                sink.close()
        finally:
            if bar is not None:
                bar.close()

    download_checkpoint_archive = future(download_checkpoint_archive_async)

    @on_client_loop
    async def download_checkpoint_archive_by_checkpoint_path_async(
        self,
        checkpoint_path: str,
        destination: str | os.PathLike[str] | None = None,
        *,
        progress: ProgressCallback | None = None,
        show_progress: bool = False,
        max_bytes: int = MAX_ARCHIVE_BYTES,
    ) -> bytes | Path:
        """``download_checkpoint_archive`` for the checkpoint at ``hpcai://...``."""
        parsed = parse_checkpoint_path(checkpoint_path)
        return await self.download_checkpoint_archive_async(
            parsed.training_run_id,
            parsed.checkpoint_id,
            destination,
            progress=progress,
            show_progress=show_progress,
            max_bytes=max_bytes,
        )

    download_checkpoint_archive_by_checkpoint_path = future(
        download_checkpoint_archive_by_checkpoint_path_async
    )


class _Sink(Protocol):
    async def write(self, block: bytes, total: int | None) -> None: ...
    def finish(self) -> bytes | Path: ...
    def close(self) -> None: ...


class _MemorySink:
    """The archive in memory, refused once it is known to exceed ``max_bytes``."""

    def __init__(self, max_bytes: int, path: str) -> None:
        self._max, self._path = max_bytes, path
        self._data = bytearray()

    async def write(self, block: bytes, total: int | None) -> None:
        if not block:  # a body starts (again, on a retry)
            self._data.clear()
        if max(total or 0, len(self._data) + len(block)) > self._max:
            size = f"{total} bytes" if total else f"more than {self._max} bytes"
            raise ConfigurationError(
                f"the archive at {self._path} is {size}, over max_bytes={self._max}: pass destination= "
                "to stream it to a file, or a larger max_bytes"
            )
        self._data += block

    def finish(self) -> bytes:
        return bytes(self._data)

    def close(self) -> None:
        self._data = bytearray()


class _FileSink:
    """The archive streamed to a temporary file beside ``target``, renamed into place once complete."""

    def __init__(self, destination: Path, name: str) -> None:
        target = destination / name if destination.is_dir() else destination
        self.target = target
        self._partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        self._file: IO[bytes] | None = None

    async def write(self, block: bytes, total: int | None) -> None:
        if not block:  # a body starts: (re)write the file from the beginning
            if self._file is None:
                self._file = self._partial.open("wb")
            self._file.seek(0)
            self._file.truncate()
            return
        assert self._file is not None
        await asyncio.to_thread(self._file.write, block)

    def finish(self) -> Path:
        assert self._file is not None
        self._file.close()
        os.replace(self._partial, self.target)
        return self.target

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._partial.unlink(missing_ok=True)


def _counting(
    sink: _Sink, progress: ProgressCallback | None, bar: ProgressBar | None
) -> Callable[[bytes, int | None], Awaitable[None]]:
    """The transport's sink: ``sink.write`` plus the progress callback and bar."""
    written = 0

    async def write(block: bytes, total: int | None) -> None:
        nonlocal written
        await sink.write(block, total)
        written = len(block) + (written if block else 0)
        if progress is not None and block:
            progress(written, total)
        if bar is not None:
            bar(written, total)

    return write
