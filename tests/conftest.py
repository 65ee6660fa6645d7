"""Shared fixtures: local servers on 127.0.0.1, each on its own event-loop thread (for sync and async tests).

* ``null_server``    -- a ``LocalServer`` with ``NullEngine`` (instant zero answers, model ``null/instant``);
* ``server``         -- a ``LocalServer`` with the real PyTorch engine and the built-in model
                        (``hpcai-async/tiny-qwen3``); one engine is shared by the whole session, so the
                        model loads once; skipped only where torch is not installed;
* ``server_factory`` -- ``start(**LocalServer kwargs) -> LocalServer`` (NullEngine unless ``engine=`` is
                        given); every server it started is closed at the end of the test. For restarts on
                        one ``store``, short ``long_poll_s`` / ``retention_s`` / ``seq_gap_timeout_s`` etc.;
* ``real_engine``    -- the session's shared ``Engine`` (pass it as ``engine=`` to ``server_factory``).

Each server has a fresh temporary store (deleted afterwards) unless ``store=`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hpcai_async.server import LocalServer, NullEngine


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
