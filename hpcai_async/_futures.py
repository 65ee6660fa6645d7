"""APIFuture: the handle of a submitted request -- awaitable on any loop, ``.result()`` from other threads.

(And ``QueueState``: what the server says about a request that waits, reported to the clients' observer.)

An APIFuture wraps work running on its client's event loop: an ``asyncio`` task there (the coroutine API) or
the ``concurrent.futures.Future`` of a coroutine handed to that loop from another thread (the blocking API).
Polling runs in the background from submission on; the future only waits for it.

* ``await fut`` / ``await fut.result_async(timeout)`` work on the client's loop and on any other loop;
* ``fut.result(timeout)`` blocks the calling thread; on the client's own loop thread it raises
  ``RuntimeError`` at once (it could never finish there);
* a timeout raises ``APITimeoutError`` (a ``TimeoutError``) and leaves the work running, so one can wait
  again; ``fut.cancel()`` stops it (polling stops; a training request already handed to the server still runs
  there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import math
import threading
import time
from collections.abc import Generator
from typing import Any, Generic, TypeVar

from ._errors import APITimeoutError

__all__ = ("APIFuture", "QueueState", "QueueStateObserver")

_log = logging.getLogger("hpcai_async")

T = TypeVar("T")

_LOCK = threading.Lock()


def _copy_state(source: asyncio.Future[Any], dest: concurrent.futures.Future[Any]) -> None:
    if dest.done():
        return
    if source.cancelled():
        dest.cancel()
    elif (exc := source.exception()) is not None:
        dest.set_exception(exc)
    else:
        dest.set_result(source.result())


class APIFuture(Generic[T]):
    """The result of a request that is (or will be) running on the server.

    Awaitable (``await fut``), with ``result(timeout=None)``, ``result_async(timeout=None)``, ``done()``,
    ``cancelled()`` and ``cancel()``.
    """

    __slots__ = ("_cf", "_loop", "_task")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, source: asyncio.Future[T] | concurrent.futures.Future[T]
    ) -> None:
        self._loop = loop
        self._task: asyncio.Future[T] | None = None
        self._cf: concurrent.futures.Future[T] | None = None
        if isinstance(source, concurrent.futures.Future):
            self._cf = source
        else:
            self._task = source

    # ----------------------------------------------------------------------------------------- waiting

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    async def result_async(self, timeout: float | None = None) -> T:  # noqa: ASYNC109 - the SDK's signature
        """Wait for the result on any loop; ``APITimeoutError`` after ``timeout`` s (the work goes on)."""
        task = self._task
        if task is not None and task.done():
            return task.result()  # already there (the usual case when a burst is gathered): no waiter
        waiter = self._waiter(asyncio.get_running_loop())
        if timeout is None:
            return await waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                raise  # the request itself timed out
            raise APITimeoutError(f"no result after {timeout:g} s (the request is still running)") from None

    def result(self, timeout: float | None = None) -> T:
        """Block this thread until the result is there; ``APITimeoutError`` after ``timeout`` seconds."""
        task = self._task
        if task is not None and task.done():
            return task.result()  # already there: no waiting, on any thread
        if not self.done():
            if _running_loop() is self._loop:
                raise RuntimeError(
                    "APIFuture.result() blocks, but it was called on the event loop that produces the "
                    "result, where it would deadlock: use `await future` or `await future.result_async()`"
                )
            if not self._loop.is_running():
                raise RuntimeError("APIFuture.result(): the event loop of this request is not running")
        cf = self._concurrent()
        try:
            return cf.result(timeout)
        except concurrent.futures.TimeoutError:
            if cf.done():
                raise
            raise APITimeoutError(f"no result after {timeout:g} s (the request is still running)") from None

    def done(self) -> bool:
        source = self._task if self._task is not None else self._cf
        assert source is not None
        return source.done()

    def cancelled(self) -> bool:
        source = self._task if self._task is not None else self._cf
        assert source is not None
        return source.cancelled()

    def cancel(self) -> bool:
        """Stop waiting and polling. Returns False if the result was already there."""
        if self._cf is not None and self._task is None:
            return self._cf.cancel()
        task = self._task
        assert task is not None
        if task.done():
            return False
        if _running_loop() is self._loop:
            task.cancel()
        else:
            self._loop.call_soon_threadsafe(task.cancel)
        return True

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {state}>"

    # ----------------------------------------------------------------------------------------- plumbing

    def _concurrent(self) -> concurrent.futures.Future[T]:
        """A thread-safe view of the outcome (made once, fed from the loop; cancelling it changes nothing)."""
        cf = self._cf
        if cf is not None:
            return cf
        with _LOCK:
            if self._cf is None:
                cf = concurrent.futures.Future()
                task = self._task
                assert task is not None

                def watch() -> None:
                    task.add_done_callback(lambda t: _copy_state(t, cf))

                if task.done():
                    _copy_state(task, cf)
                elif _running_loop() is self._loop:
                    watch()
                else:
                    self._loop.call_soon_threadsafe(watch)
                self._cf = cf
            return self._cf

    def _waiter(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[T]:
        """A future on ``loop`` following the outcome; cancelling it (a timeout) does not cancel the work."""
        if self._task is not None and loop is self._loop:
            return asyncio.shield(self._task)
        cf = self._concurrent()
        waiter: asyncio.Future[T] = loop.create_future()

        def deliver(done: concurrent.futures.Future[T]) -> None:
            if waiter.done():
                return
            if done.cancelled():
                waiter.cancel()
            elif (exc := done.exception()) is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(done.result())

        def on_done(done: concurrent.futures.Future[T]) -> None:
            if loop.is_closed():
                return
            if _running_loop() is loop:
                deliver(done)
            else:
                with contextlib.suppress(RuntimeError):  # the waiting loop closed meanwhile: nobody to tell
                    loop.call_soon_threadsafe(deliver, done)

        cf.add_done_callback(on_done)
        return waiter


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class QueueState(enum.Enum):
    """Where a waiting request stands, as a ``try_again`` poll answer says (the official SDK's values)."""

    ACTIVE = "active"
    PAUSED_RATE_LIMIT = "paused_rate_limit"
    IN_QUEUE = "in_queue"
    UNKNOWN = "unknown"


_QUEUE_STATES = {state.value: state for state in QueueState} | {"paused_capacity": QueueState.IN_QUEUE}
_QUEUE_LOG_INTERVAL = 60.0  # s between two log lines of one client, as the official client


class QueueStateObserver:
    """``on_queue_state_change(state)``: called when a client's waiting requests change queue state.

    The clients call it when a poll's ``try_again`` reports another state (our own batching marker is not a
    state) and when sampling is throttled (429: ``PAUSED_RATE_LIMIT``). The default logs a warning at most
    once a minute for states other than ``ACTIVE``, as the official client does; override it to react.
    """

    _queue_state: QueueState = QueueState.ACTIVE
    _queue_logged_at: float = -math.inf

    def on_queue_state_change(self, queue_state: QueueState) -> None:
        if queue_state is QueueState.ACTIVE:
            return
        now = time.monotonic()
        if now - self._queue_logged_at < _QUEUE_LOG_INTERVAL:
            return
        self._queue_logged_at = now
        reason = {
            QueueState.PAUSED_RATE_LIMIT: "concurrent rate limit hit",
            QueueState.IN_QUEUE: "request is in queue, waiting for available resources",
        }.get(queue_state, "unknown")
        _log.warning("%s is paused: %s", type(self).__name__, reason)

    def _observe_queue_state(self, raw: str | QueueState) -> None:
        state = raw if isinstance(raw, QueueState) else _QUEUE_STATES.get(raw)
        if state is None or state is self._queue_state:  # not a state (e.g. "batch"), or no change
            return
        self._queue_state = state
        self.on_queue_state_change(state)
