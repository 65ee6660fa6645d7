"""How a server starts and stops, and what it holds while it runs (the keys of its aiohttp application).

``build_app`` puts ``lifecycle(...)`` in the application's ``cleanup_ctx``: at startup it opens the store,
starts the io threads and the scheduler (which builds the engine on its device thread) and publishes the
``Service`` under ``SERVICE``; on each of the scheduler's expiry ticks (every 30 s at most) it writes the
runs' request times and removes the checkpoints whose ``ttl_seconds`` ran out (``Store.sweep``); at cleanup
it lets a running engine call finish and closes all of it in reverse. So any aiohttp runner --
``LocalServer``'s, or ``web.run_app`` -- runs the whole server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from .engine_api import EngineAPI
from .scheduler import Scheduler
from .service import Service
from .store import Store

__all__ = (
    "API_KEY",
    "BODY_TIMEOUT_S",
    "DEFAULT_LIMITS",
    "FEATURES_KEY",
    "HEAD_TIMEOUT_S",
    "LIMITS",
    "MAX_BODY_BYTES",
    "SCHEDULER",
    "SERVICE",
    "Limits",
    "lifecycle",
)

SERVICE = web.AppKey("service", Service)
SCHEDULER = web.AppKey("scheduler", Scheduler)
API_KEY = web.AppKey("api_key", str)
FEATURES_KEY = web.AppKey("features", list)

MAX_BODY_BYTES = 256 << 20  # a real batch (thousands of sequences of a few thousand tokens) fits
BODY_TIMEOUT_S = 120.0  # s to read a whole body: 256 MiB at ~2 MB/s; a stalled client is dropped after it
HEAD_TIMEOUT_S = 60.0  # s to read a request's head, and the idle time a kept-alive connection may wait


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one request may take: body bytes (after gzip inflation) and seconds to send its body."""

    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout_s: float = BODY_TIMEOUT_S


DEFAULT_LIMITS = Limits()
LIMITS = web.AppKey("limits", Limits)

Lifecycle = Callable[[web.Application], AsyncIterator[None]]


def lifecycle(
    scheduler: Scheduler,
    engine_factory: Callable[[], EngineAPI],
    store_path: str | os.PathLike[str] | None,
    close_engine: bool = True,
    seq_ids: bool = True,
    queue_duration: bool = True,
) -> Lifecycle:
    """The ``cleanup_ctx`` entry that runs the server (see the module docstring)."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        store = Store(None if store_path is None else Path(store_path))
        # blocking store work on the event loop's behalf (flushes, REST routes)
        io = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="hpcai-server-io")
        loop = asyncio.get_running_loop()

        async def tick() -> None:
            await loop.run_in_executor(io, store.flush)
            await loop.run_in_executor(io, store.sweep)

        try:
            await scheduler.start(engine_factory, on_tick=tick)
            app[SERVICE] = Service(scheduler, store, io, seq_ids=seq_ids, queue_duration=queue_duration)
            yield
        finally:
            await scheduler.stop(close_engine=close_engine)
            io.shutdown(wait=True)
            store.close()

    return run
