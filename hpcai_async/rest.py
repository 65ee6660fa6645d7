"""RestClient: training runs and checkpoints (list, show, delete, download), and the checkpoint-path parser.

Archives are streamed to disk, never held in memory: they are written to a temporary file beside the
destination and renamed into place once complete, so a failed download leaves nothing half-written behind.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import _wire
from ._http import Request, Transport
from ._loop import LoopBinding, future, on_client_loop
from ._wire import ParsedCheckpointPath
from .types import CheckpointsListResponse, TrainingRun, TrainingRunsResponse

__all__ = ("ParsedCheckpointPath", "ProgressCallback", "RestClient", "parse_checkpoint_path")

ProgressCallback = Callable[[int, int | None], None]
"""Called as ``progress(bytes_written, total_bytes_or_None)`` while an archive downloads."""


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
        """The training and sampler checkpoints of a run."""
        path = f"training_runs/{_segment(training_run_id)}/checkpoints"
        return await self._transport.request("GET", path, CheckpointsListResponse)

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
    ) -> Path:
        """Stream a checkpoint's ``.tar.gz`` archive to ``destination``; return the file's path.

        ``destination`` is a file or an existing folder (default: ``{run}_{checkpoint}.tar.gz`` in the current
        folder). ``progress(bytes_written, total_or_None)`` is called as the data arrives; ``show_progress``
        draws a progress bar on stderr (tqdm's when installed).
        """
        name = f"{training_run_id}_{checkpoint_id}.tar.gz".replace("/", "_")
        target = Path(destination) if destination is not None else Path.cwd() / name
        if target.is_dir():
            target = target / name
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        path = f"training_runs/{_segment(training_run_id)}/checkpoints/{_segment(checkpoint_id)}/archive"
        bar = _ProgressBar(target.name) if show_progress else None
        transport = self._transport
        file = None
        written = 0

        async def sink(block: bytes, total: int | None) -> None:
            nonlocal file, written
            if not block:  # a body starts: (re)write the file from the beginning
                if file is None:
                    file = partial.open("wb")
                file.seek(0)
                file.truncate()
                written = 0
                if bar is not None:
                    bar.start(total)
                return
            assert file is not None
            await asyncio.to_thread(file.write, block)
            written += len(block)
            if progress is not None:
                progress(written, total)
            if bar is not None:
                bar.update(written)

        request = Request("GET", path, headers={"Accept": _wire.GZIP}, sink=sink)
        try:
            await transport.retrying(request, transport.retry.budget(f"GET {path}"))
            assert file is not None
            file.close()
            os.replace(partial, target)
        finally:
            if file is not None:
                file.close()
            partial.unlink(missing_ok=True)
            if bar is not None:
                bar.close()
        return target

    download_checkpoint_archive = future(download_checkpoint_archive_async)

    @on_client_loop
    async def download_checkpoint_archive_by_checkpoint_path_async(
        self,
        checkpoint_path: str,
        destination: str | os.PathLike[str] | None = None,
        *,
        progress: ProgressCallback | None = None,
        show_progress: bool = False,
    ) -> Path:
        """``download_checkpoint_archive`` for the checkpoint at ``hpcai://...``."""
        parsed = parse_checkpoint_path(checkpoint_path)
        return await self.download_checkpoint_archive_async(
            parsed.training_run_id,
            parsed.checkpoint_id,
            destination,
            progress=progress,
            show_progress=show_progress,
        )

    download_checkpoint_archive_by_checkpoint_path = future(
        download_checkpoint_archive_by_checkpoint_path_async
    )


class _ProgressBar:
    """tqdm's bar when tqdm is installed, else a plain line on stderr redrawn at most 5 times a second."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._tqdm: Any = None
        self._shown = 0
        self._drawn_at = 0.0
        self._total: int | None = None

    def start(self, total: int | None) -> None:
        self._total, self._shown = total, 0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        if self._tqdm is None:
            self._tqdm = tqdm(total=total, desc=self._label, unit="B", unit_scale=True, unit_divisor=1024)
        else:
            self._tqdm.reset(total=total)

    def update(self, written: int) -> None:
        if self._tqdm is not None:
            self._tqdm.update(written - self._shown)
            self._shown = written
            return
        now = time.monotonic()
        if now - self._drawn_at >= 0.2 or written == self._total:
            self._drawn_at = now
            share = f" {100 * written / self._total:5.1f}%" if self._total else ""
            sys.stderr.write(f"\r{self._label}: {written / 2**20:,.1f} MiB{share}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._drawn_at:
            sys.stderr.write("\n")
