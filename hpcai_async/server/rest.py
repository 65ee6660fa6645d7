"""The REST routes of the local server: training runs, their checkpoints, deletion and archive downloads.

They read and change only the store (``store.py``), through the service's io threads so that disk work never
blocks the event loop. An archive is streamed as it is written (never all of it in memory).
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from .. import types
from .._errors import BadRequestError, NotFoundError
from .codec import Codec
from .lifecycle import SERVICE
from .store import RunRecord

__all__ = ("REST_ROUTES",)


def _query_int(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"query parameter {name}: {raw[:50]!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequestError(f"query parameter {name}: must be {bound}, got {value}")
    return value


def _run(request: web.Request) -> RunRecord:
    run_id = request.match_info["run_id"]
    run = request.app[SERVICE].store.get_run(run_id)
    if run is None:
        raise NotFoundError(
            f"training run {run_id[:200]!r} does not exist on this server; list the runs with "
            "GET /api/v1/training_runs"
        )
    return run


async def list_training_runs(request: web.Request) -> web.Response:
    limit = _query_int(request, "limit", 20, 1, 1000)
    offset = _query_int(request, "offset", 0, 0, None)
    store = request.app[SERVICE].store
    runs, total = store.list_runs(limit, offset)
    return Codec.of(request).reply(
        types.TrainingRunsResponse(
            training_runs=[store.training_run(r) for r in runs],
            cursor=types.Cursor(offset=offset, limit=limit, total_count=total),
        )
    )


async def get_training_run(request: web.Request) -> web.Response:
    return Codec.of(request).reply(request.app[SERVICE].store.training_run(_run(request)))


async def list_checkpoints(request: web.Request) -> web.Response:
    run = _run(request)
    checkpoints = request.app[SERVICE].store.list_checkpoints(run.run_id)
    return Codec.of(request).reply(types.CheckpointsListResponse(checkpoints=checkpoints))


async def delete_checkpoint(request: web.Request) -> web.Response:
    run = _run(request)
    ckpt = request.match_info["checkpoint_id"]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        request.app[SERVICE].io, request.app[SERVICE].store.delete_checkpoint, run.run_id, ckpt
    )
    return web.Response(status=204)


async def checkpoint_archive(request: web.Request) -> web.StreamResponse:
    run = _run(request)
    ckpt = request.match_info["checkpoint_id"]
    ref = request.app[SERVICE].store.get_checkpoint(run.run_id, ckpt)
    chunks = request.app[SERVICE].store.iter_archive(ref)
    loop, io = asyncio.get_running_loop(), request.app[SERVICE].io
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/gzip",
            "Content-Disposition": f'attachment; filename="{run.run_id}-{ckpt}.tar.gz"',
        }
    )
    response.enable_chunked_encoding()
    try:
        first = await loop.run_in_executor(io, next, chunks, None)  # errors here still get a status
        await response.prepare(request)
        chunk = first
        while chunk is not None:
            await response.write(chunk)
            chunk = await loop.run_in_executor(io, next, chunks, None)
        await response.write_eof()
    finally:
        # ValueError: still running in the io thread after a cancellation; it ends with the generator
        with contextlib.suppress(ValueError):
            chunks.close()
    return response


_RUNS = "/api/v1/training_runs"
_CHECKPOINT = _RUNS + "/{run_id}/checkpoints/{checkpoint_id}"
REST_ROUTES = [
    web.get(_RUNS, list_training_runs),
    web.get(_RUNS + "/{run_id}", get_training_run),
    web.get(_RUNS + "/{run_id}/checkpoints", list_checkpoints),
    web.delete(_CHECKPOINT, delete_checkpoint),
    web.get(_CHECKPOINT + "/archive", checkpoint_archive),
]
