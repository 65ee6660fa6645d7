"""The local server: the whole HPC-AI API on one machine -- ``LocalServer`` (embedded), ``serve`` (blocking).

::

    with LocalServer() as srv:                  # its own event loop, in a background thread
        client = ServiceClient(base_url=srv.url, api_key=srv.api_key)

    async with LocalServer() as srv:            # on the running loop
        ...

Defaults: 127.0.0.1 on a free port, a temporary store (deleted on exit), a generated API key, the real PyTorch
engine with the built-in model. ``engine=NullEngine`` answers instantly and computes nothing (benchmarks of
the client's own overhead). ``python -m hpcai_async.server`` runs it from the command line."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from .._loop import new_event_loop
from .app import DIALECTS, build_app
from .engine_api import EngineAPI
from .lifecycle import SERVICE
from .null_engine import NULL_MODEL, NullEngine
from .scheduler import Scheduler
from .store import Store

__all__ = ("LocalServer", "NULL_MODEL", "NullEngine", "serve", "serve_async")

EngineSpec = EngineAPI | Callable[[], EngineAPI] | None


class LocalServer:
    """An HPC-AI compatible server on ``host:port`` (see the module docstring).

    ``engine``: None builds the real ``Engine(models, device=device)`` (the built-in model plus ``models``);
    a class or zero-argument factory (``NullEngine``) is called on the device thread; an engine object is used
    as is and not closed at the end (so tests can share one across servers). ``store``: a folder for runs and
    checkpoints (kept), or None for a temporary one (deleted on exit). ``api_key``: generated when None.
    ``long_poll_s``: how long ``retrieve_future`` holds a request for a result before ``try_again``;
    ``retention_s``: how long a finished result can be fetched; ``seq_gap_timeout_s``: how long requests wait
    for a missing earlier ``seq_id``. ``dialect``: ``"local"`` advertises every protocol extension of ours;
    ``"hosted"`` advertises none, as the hosted service does, so clients speak the plain protocol to it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        store: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        models: Sequence[str] = (),
        device: str = "cpu",
        engine: EngineSpec = None,
        long_poll_s: float = 25.0,
        retention_s: float = 3600.0,
        seq_gap_timeout_s: float = 60.0,
        dialect: str = "local",
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {sorted(DIALECTS)}, got {dialect[:50]!r}")
        self.dialect = dialect
        self.host = host
        self.port = port
        self.store_path = Path(store) if store is not None else None
        self.api_key = api_key or f"hpcai-local-{secrets.token_hex(16)}"
        self.models = tuple(models)
        self.device = device
        self._engine_spec = engine
        self.scheduler = Scheduler(
            long_poll_s=long_poll_s, retention_s=retention_s, seq_gap_timeout_s=seq_gap_timeout_s
        )
        self.store: Store | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        """The base URL clients use (``HPCAI_BASE_URL``), e.g. ``http://127.0.0.1:8000``."""
        host = self.host
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"http://{host}:{self.port}"

    @property
    def engine(self) -> EngineAPI | None:
        return self.scheduler.engine

    def _engine_factory(self) -> tuple[Callable[[], EngineAPI], bool]:
        spec = self._engine_spec
        if spec is None:
            models, device = self.models, self.device

            def build() -> EngineAPI:
                from .engine import Engine

                engine: EngineAPI = Engine(models, device=device)
                return engine

            return build, True
        if callable(spec):
            return spec, True
        return (lambda: spec), False

    # -------------------------------------------------------------------------------------------- async

    async def start(self) -> None:
        """Open the store, start the engine's device thread, and listen. Use ``stop`` (or ``async with``)."""
        if self._runner is not None:
            raise RuntimeError("this LocalServer is already running")
        factory, owns_engine = self._engine_factory()
        app = build_app(
            factory,
            api_key=self.api_key,
            store=self.store_path,
            scheduler=self.scheduler,
            dialect=self.dialect,
            close_engine=owns_engine,
        )
        runner = self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=5.0
        )
        try:
            await runner.setup()  # the app's cleanup_ctx: store, engine, scheduler
            self.store = app[SERVICE].store
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await self._shutdown()
            raise
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Answer waiting long-polls, stop listening, let a running engine call finish, close everything."""
        await self._shutdown()

    async def _shutdown(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -------------------------------------------------------------------------------------------- sync

    def __enter__(self) -> LocalServer:
        """Run the server on its own event loop in a background thread until ``__exit__`` / ``close``."""
        if self._thread is not None:
            raise RuntimeError("this LocalServer is already running")
        loop = new_event_loop()
        self._thread_loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="hpcai-server-loop", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result()
        except BaseException:
            self._end_thread()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop a server started with ``with`` (idempotent)."""
        if self._thread_loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), self._thread_loop).result()
        finally:
            self._end_thread()

    def _end_thread(self) -> None:
        loop, thread = self._thread_loop, self._thread
        if loop is None or thread is None:
            return

        async def finish() -> None:
            await loop.shutdown_asyncgens()
            await loop.shutdown_default_executor()

        try:
            asyncio.run_coroutine_threadsafe(finish(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._thread_loop = self._thread = None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_async(server: LocalServer, announce: Callable[[LocalServer], None] | None = None) -> None:
    """Run ``server`` until cancelled, SIGINT or SIGTERM; ``announce(server)`` once it listens."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stopping.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or a platform without signal handlers: Ctrl-C raises instead
    try:
        async with server:
            if announce is not None:
                announce(server)
            await stopping.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def _announce(server: LocalServer) -> None:
    if not _is_loopback(server.host):
        print(
            f"warning: listening on {server.host}, not only on this machine: anyone who can reach port "
            f"{server.port} and knows the key can use this server",
            file=sys.stderr,
        )
    print(f"HPCAI_BASE_URL={server.url}")
    print(f"HPCAI_API_KEY={server.api_key}")
    where = server.store_path if server.store_path is not None else "a temporary folder (deleted on exit)"
    print(f"# store: {where}; Ctrl-C stops the server", file=sys.stderr)
    sys.stdout.flush()


def serve(announce: Callable[[LocalServer], None] | None = _announce, **kwargs: Any) -> None:
    """Run a ``LocalServer(**kwargs)`` in the foreground until Ctrl-C or SIGTERM, printing its URL and key."""
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve_async(LocalServer(**kwargs), announce))
    except KeyboardInterrupt:
        pass
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
