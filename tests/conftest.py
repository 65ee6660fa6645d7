"""Shared fixtures: local servers on 127.0.0.1, each on its own event-loop thread (for sync and async tests).

* ``null_server``    -- a ``LocalServer`` with ``NullEngine`` (instant zero answers, model ``null/instant``);
* ``server``         -- a ``LocalServer`` with the real PyTorch engine and the built-in model
                        (``hpcai-async/tiny-qwen3``); one engine is shared by the whole session, so the
                        model loads once; skipped only where torch is not installed;
* ``server_factory`` -- ``start(**LocalServer kwargs) -> LocalServer`` (NullEngine unless ``engine=`` is
                        given); every server it started is closed at the end of the test. For restarts on
                        one ``store``, short ``long_poll_s`` / ``retention_s`` / ``seq_gap_timeout_s`` etc.;
* ``real_engine``    -- the session's shared ``Engine`` (pass it as ``engine=`` to ``server_factory``).

Event loops: every async client test on a NullEngine server (it defines a coroutine and uses ``null_server``,
in a ``test_client_*`` or ``test_porting`` module) runs once on asyncio and once on uvloop, through the
``_loop_kind`` fixture that sets ``client_fixtures.default_loop`` for ``run()``. Those tests take
milliseconds; the real-engine and blocking-API tests run once (a test can still parametrize ``loop`` itself).

Each server has a fresh temporary store (deleted afterwards) unless ``store=`` is given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import client_fixtures
import pytest

from hpcai_async.server import LocalServer, NullEngine

_ON_EVERY_LOOP = ("test_client_", "test_porting")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    fn = metafunc.function
    if (
        metafunc.module.__name__.startswith(_ON_EVERY_LOOP)
        and "null_server" in metafunc.fixturenames
        and "loop" not in metafunc.fixturenames  # it chooses its loops itself
        and "async def" in inspect.getsource(fn)  # an async test (a blocking one runs on the private loop)
    ):
        metafunc.parametrize("_loop_kind", client_fixtures.LOOPS, indirect=True)


@pytest.fixture(autouse=True)
def _loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    kind: str = getattr(request, "param", "asyncio")
    client_fixtures.default_loop = kind
    yield kind
    client_fixtures.default_loop = "asyncio"


@pytest.fixture(scope="session")
def real_engine() -> Iterator[Any]:
    try:
        import torch  # noqa: F401

        from hpcai_async.server.engine import Engine
    except ImportError as exc:  # pragma: no cover - the dev install has torch
        pytest.skip(f"the real engine needs torch: {exc}")
    engine = Engine(device="cpu")
    yield engine
    close = getattr(engine, "close", None)
    if callable(close):
        close()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., LocalServer]]:
    started: list[LocalServer] = []

    def start(**kwargs: Any) -> LocalServer:
        kwargs.setdefault("engine", NullEngine)
        srv = LocalServer(**kwargs)
        srv.__enter__()
        started.append(srv)
        return srv

    yield start
    for srv in reversed(started):
        srv.close()


@pytest.fixture
def null_server(server_factory: Callable[..., LocalServer]) -> LocalServer:
    return server_factory()


@pytest.fixture
def server(server_factory: Callable[..., LocalServer], real_engine: Any) -> LocalServer:
    return server_factory(engine=real_engine)
