"""The servers the client-overhead benches talk to, started in the bench process (clients run in children).

- ``null_server(dialect)``: our LocalServer with the NullEngine (answers every job at once, computes
  nothing), the server for client-overhead numbers, in the hosted service's terms (``"hosted"``: no
  extensions advertised) or ours (``"local"``). Falls back to the bench fixture (``_fixture``, also
  computing nothing) while the LocalServer cannot be imported, and says so in ``Server.label``.
- ``fixture_server(delay, mode)``: the protocol fixture for behaviour the NullEngine does not offer: a job
  that takes exactly ``delay`` seconds, answered by long-poll or by an immediate ``try_again``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench._common import MODEL, port_of


@dataclass
class Server:
    url: str
    api_key: str
    model: str
    label: str
    handle: Any = None

    @property
    def port(self) -> int:
        return port_of(self.url)

    def env(self) -> dict[str, str]:
        """What the official SDK reads to find it (PROTOCOL.md §1.1)."""
        return {"HPCAI_BASE_URL": self.url, "HPCAI_API_KEY": self.api_key}

    def cfg(self) -> dict[str, Any]:
        return {"url": self.url, "api_key": self.api_key, "model": self.model}


@contextlib.contextmanager
def fixture_server(delay: float = 0.0, mode: str = "long_poll") -> Iterator[Server]:
    from bench._fixture import FixtureServer

    with FixtureServer(delay=delay, mode=mode) as fx:
        label = f"bench fixture (no training; jobs take {delay * 1e3:.0f} ms, {mode.replace('_', '-')})"
        yield Server(fx.url, fx.api_key, MODEL, label, fx)


MODES = ("hosted", "local")  # server dialects every client-overhead bench runs in, hosted first
MODE_LABEL = {"hosted": "no extensions, as the hosted service", "local": "every extension of ours"}


@contextlib.contextmanager
def null_server(
    dialect: str = "local", *, engine: Any = None, long_poll_s: float | None = None
) -> Iterator[Server]:
    """The LocalServer with the NullEngine (or ``engine``) speaking ``dialect``: "hosted" or "local"."""
    try:
        from hpcai_async.server import LocalServer
        from hpcai_async.server.null_engine import NULL_MODEL, NullEngine
    except ImportError as exc:
        with fixture_server() as srv:
            srv.label = f"bench fixture, instant (LocalServer unavailable: {exc})"
            yield srv
        return
    kwargs: dict[str, Any] = {"engine": engine or NullEngine(), "port": 0, "host": "127.0.0.1"}
    params = inspect.signature(LocalServer).parameters
    if "dialect" in params:
        kwargs["dialect"] = dialect
    if long_poll_s is not None:
        kwargs["long_poll_s"] = long_poll_s
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hpcai-bench-store-") as store:
        kwargs["store"] = store
        with LocalServer(**kwargs) as server:
            label = f"LocalServer + NullEngine (no training), {dialect} dialect"
            yield Server(server.url, server.api_key, NULL_MODEL, label, server)


def slow_null_engine(delay: float) -> Any:
    """A NullEngine whose forward_backward takes ``delay`` s (a sleep on the device thread; no training)."""
    import time

    from hpcai_async.server.null_engine import NullEngine

    class SlowNullEngine(NullEngine):
        def forward_backward(self, run_id: str, data: Any, loss_fn: str) -> Any:
            time.sleep(delay)
            return super().forward_backward(run_id, data, loss_fn)

    return SlowNullEngine()


@contextlib.contextmanager
def engine_server(threads: int | None = None, dialect: str = "local") -> Iterator[Server]:
    """The LocalServer with its real PyTorch Engine and the built-in model (``threads``: torch intra-op)."""
    import functools
    import tempfile

    from hpcai_async.server import LocalServer
    from hpcai_async.server.engine import Engine

    params = inspect.signature(LocalServer).parameters
    with tempfile.TemporaryDirectory(prefix="hpcai-bench-store-") as store:
        kwargs: dict[str, Any] = {"store": store} if "store" in params else {}
        if "dialect" in params:
            kwargs["dialect"] = dialect
        if threads is not None:
            kwargs["engine"] = functools.partial(Engine, threads=threads)
        with LocalServer(**kwargs) as server:
            yield Server(
                server.url,
                server.api_key,
                "hpcai-async/tiny-qwen3",
                f"LocalServer + Engine (CPU), {dialect} dialect",
                server,
            )
