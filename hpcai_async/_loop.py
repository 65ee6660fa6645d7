"""Event loops: the factory (uvloop when installed), loop binding, and the one generic sync-over-async bridge.

All client logic is coroutines. The blocking methods are generated from the coroutines by three decorators,
so no signature or docstring is written twice (anyio's ``BlockingPortal`` is the model):

* ``blocking(f_async)``  -- runs ``f_async`` on the client's loop and waits for its value;
* ``future(f_async)``    -- runs it there and returns an ``APIFuture`` of its value at once;
* ``submit(f_async)``    -- for coroutines that return an ``APIFuture`` (training submissions): returns an
  ``APIFuture`` of the final result at once. Coroutines handed to one loop start in FIFO order and reserve
  their sequence ids before their first ``await``, so call order stays wire order.

Sync and async
--------------
A ServiceClient and every client it creates are *bound* to one event loop, the loop their HTTP session
lives on, chosen by the first call:

1. First used from a coroutine, a client binds to that running loop: its coroutine methods run there
   directly, at native speed, with no thread hop.
2. First used from plain (blocking) code, it binds to a private loop in a daemon thread (one per process,
   started on first use). Its coroutine methods awaited on any other loop (a notebook's, an
   ``asyncio.run`` inside the script) run on the private loop and hand their result back.
3. A plain method called from a thread that is not running the client's loop waits for the loop's answer.
4. A plain method called *on the client's own loop thread* (``async def`` code calling a blocking form) can
   never be answered by a loop it blocks, so:

   * a method whose plain form returns a future and whose order cannot matter is scheduled on the loop as
     a task and its future returned at once: ``sample``, ``compute_logprobs``, the RestClient's methods, and
     ``unload_model`` (it runs after everything called before it; it ends the run). Await the future, or
     let it finish in the background; its ``result()`` on that thread raises, as it could never finish.
     One exception: ``unload_model()`` of a TrainingClient with nothing outstanding (every earlier call
     answered, as in the cookbook's ``UnloadContextManager``) unloads at once through a helper transport
     on a helper loop, so its ``result()`` completes, as with the official SDK;
   * ``get_tokenizer()`` does its work without the loop (the tokenizer of the client's ``base_model``,
     loaded in the calling thread);
   * everything else (ordered training calls, blocking methods that need the server) raises
     ``RuntimeError`` at once naming the coroutine to await, instead of deadlocking.

When the bound loop has been closed (a script that calls ``asyncio.run`` twice), the next call binds again.
(Over 400 lines: the binding rules above and the wrappers that apply them are one concern, read together.)
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import inspect
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from ._futures import APIFuture

__all__ = (
    "LoopBinding",
    "LoopThread",
    "blocking",
    "close_at_exit",
    "future",
    "new_event_loop",
    "on_client_loop",
    "on_own_thread",
    "private_loop",
    "run_blocking",
    "submit",
)

T = TypeVar("T")
P = ParamSpec("P")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when installed, unless ``HPCAI_ASYNC_NO_UVLOOP=1``."""
    if os.environ.get("HPCAI_ASYNC_NO_UVLOOP", "") not in ("1", "true", "yes"):
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class Closable(Protocol):
    def aclose(self) -> Coroutine[Any, Any, None]: ...


class LoopThread:
    """An event loop running in a daemon thread: the one helper for "a loop in a thread".

    Used for the client's private loop, and by tests that need a loop of their own beside the caller's.
    ``start()`` returns once the loop runs; ``run(coro)`` runs a coroutine there and waits for its value;
    ``stop()`` cancels what is left, stops the loop, joins the thread and closes the loop.
    """

    def __init__(self, name: str, factory: Callable[[], asyncio.AbstractEventLoop] = new_event_loop) -> None:
        self.name = name
        self._factory = factory
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> asyncio.AbstractEventLoop:
        if self.loop is not None:
            return self.loop
        loop = self._factory()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(loop, ready), name=self.name, daemon=True)
        self._thread.start()
        ready.wait()
        self.loop = loop
        return loop

    @staticmethod
    def _main(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop (started if need be) and wait for its value."""
        return asyncio.run_coroutine_threadsafe(coro, self.start()).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):  # a loop already stopped: nothing left to cancel
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        self.loop = self._thread = None

    def __enter__(self) -> asyncio.AbstractEventLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PrivateLoop:
    """The private event loop behind the blocking methods: one LoopThread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread = LoopThread("hpcai-async-loop")
        self._closables: weakref.WeakSet[Closable] = weakref.WeakSet()

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self._thread.loop
        if loop is not None:
            return loop
        with self._lock:
            if self._thread.loop is None:
                self._thread.start()
                atexit.register(self._shutdown)
            loop = self._thread.loop
            assert loop is not None
            return loop

    def close_at_exit(self, obj: Closable) -> None:
        with self._lock:
            self._closables.add(obj)

    def _shutdown(self) -> None:
        loop = self._thread.loop
        if loop is None or not loop.is_running():
            return
        with self._lock:
            closables = list(self._closables)

        async def close_all() -> None:
            await asyncio.gather(*(c.aclose() for c in closables), return_exceptions=True)

        with contextlib.suppress(Exception):  # best effort at exit; nobody is left to tell
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=2.0)


_PRIVATE = _PrivateLoop()


def close_at_exit(obj: Closable) -> None:
    """Have ``obj.aclose()`` run on the private loop at interpreter exit (sessions left open by scripts)."""
    _PRIVATE.close_at_exit(obj)


def private_loop() -> asyncio.AbstractEventLoop:
    """The process-wide private loop (a daemon thread running uvloop or asyncio), started on first use."""
    return _PRIVATE.get()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class LoopBinding:
    """The event loop a ServiceClient and its children live on; set by the first call, sync or async.

    ``on_bind(loop, private)`` is called when a loop is bound; ``on_rebind()`` first when the bound loop was
    closed and a new one takes its place (a script that runs ``asyncio.run`` twice with one client).
    """

    def __init__(
        self, on_bind: Callable[[asyncio.AbstractEventLoop, bool], None], on_rebind: Callable[[], None]
    ) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._on_bind = on_bind
        self._on_rebind = on_rebind

    def for_async(self) -> asyncio.AbstractEventLoop:
        """From a coroutine: the client's loop; binds to the running loop if unbound (or old one closed)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            return loop
        running = asyncio.get_running_loop()
        with self._lock:
            if self.loop is None or self.loop.is_closed():
                if self.loop is not None:
                    self._on_rebind()
                self.loop = running
                self._on_bind(running, False)
            return self.loop

    def for_sync(self, what: str, *, own_thread: bool = False) -> asyncio.AbstractEventLoop:
        """The loop for blocking work; binds to the private loop if unbound.

        Refuses the loop's own thread (where the caller would wait forever) unless ``own_thread``: the caller
        then knows it is on that loop (``on_own_thread``) and will not wait.
        """
        loop = self.loop
        if loop is None or loop.is_closed():
            with self._lock:
                if self.loop is None or self.loop.is_closed():
                    if self.loop is not None:
                        self._on_rebind()
                    self.loop = private_loop()
                    self._on_bind(self.loop, True)
                loop = self.loop
        if _running_loop() is loop and not own_thread:
            raise RuntimeError(
                f"{what}() blocks, but it was called on the event loop this client runs on, where it would "
                f"deadlock: await the coroutine instead (`await {what}_async(...)`)"
            )
        if not loop.is_running():
            raise RuntimeError(
                "this client is bound to an event loop that is not running; "
                "call its coroutine methods on that loop"
            )
        return loop


class Bound(Protocol):
    """Anything with a loop binding: every client class."""

    @property
    def _binding(self) -> LoopBinding: ...


S = TypeVar("S", bound=Bound)


def _name(fn: Callable[..., Any]) -> str:
    return fn.__name__.removesuffix("_async")


def mark_sync_form(fn: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
    functools.update_wrapper(wrapper, fn)
    name = _name(fn)
    wrapper.__name__ = name
    wrapper.__qualname__ = fn.__qualname__.removesuffix("_async")
    wrapper.__doc__ = (
        f"Blocking form of ``{fn.__name__}`` (for scripts, threads and notebooks).\n\n{fn.__doc__ or ''}"
    )


def on_own_thread(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the calling thread is the one running ``loop`` (a blocking wait there would never end)."""
    return _running_loop() is loop


def blocking(
    fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
    *,
    without_loop: Callable[Concatenate[S, P], T] | None = None,
) -> Callable[Concatenate[S, P], T]:
    """``x = blocking(x_async)``: run ``x_async`` on the client's loop and wait for its value.

    ``without_loop``: what the plain form does when called on the client's own loop thread (rule 4 of
    "Sync and async"), for work that can be done without the loop; without it such a call raises.
    """

    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        what = f"{type(self).__name__}.{_name(fn)}"
        loop = self._binding.for_sync(what, own_thread=without_loop is not None)
        if without_loop is not None and on_own_thread(loop):
            return without_loop(self, *args, **kwargs)
        return run_blocking(loop, fn(self, *args, **kwargs))

    mark_sync_form(fn, wrapper)
    return wrapper


def run_blocking(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` (another thread's) and block until it is done: its value, or its error.

    What ``run_coroutine_threadsafe(coro, loop).result()`` does, with a bare lock that the task releases as
    its last step instead of a ``concurrent.futures.Future`` (a condition variable, callbacks chained both
    ways, one more loop turn): the hop there and back is the cost of every blocking call. An interrupt while
    waiting (Ctrl-C) cancels the task.
    """
    done = threading.Lock()
    done.acquire()
    outcome: list[Any] = []  # [value, error]

    async def run() -> None:
        try:
            outcome[:] = [await coro, None]
        except BaseException as exc:  # handed to the caller, not to the loop
            outcome[:] = [None, exc]
        finally:
            done.release()

    tasks: list[asyncio.Task[None]] = []
    loop.call_soon_threadsafe(lambda: tasks.append(loop.create_task(run())))
    try:
        done.acquire()
    except BaseException:
        loop.call_soon_threadsafe(lambda: [task.cancel() for task in tasks])  # runs after the task started
        raise
    value, error = outcome
    if error is None:
        return value  # type: ignore[no-any-return]
    try:
        if isinstance(error, asyncio.CancelledError):
            raise concurrent.futures.CancelledError() from None  # what ``Future.result()`` raised here before
        raise error
    finally:
        outcome.clear()  # no cycle through the traceback's frames
        del error


def future(
    fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], APIFuture[T]]:
    """``x = future(x_async)``: start ``x_async`` on the client's loop, return an APIFuture of its value."""

    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> APIFuture[T]:
        loop = self._binding.for_sync(f"{type(self).__name__}.{_name(fn)}", own_thread=True)
        return _start(loop, fn(self, *args, **kwargs))

    mark_sync_form(fn, wrapper)
    signature = inspect.signature(fn)  # what help() shows: the same parameters, an APIFuture of the value
    returns = signature.return_annotation
    returns = returns if isinstance(returns, str) else getattr(returns, "__name__", repr(returns))
    wrapper.__signature__ = signature.replace(return_annotation=f"APIFuture[{returns}]")  # type: ignore[attr-defined]
    return wrapper


async def _then(submission: Coroutine[Any, Any, APIFuture[T]]) -> T:
    inner = await submission
    try:
        return await inner
    except asyncio.CancelledError:
        inner.cancel()  # cancelling the outer future stops the polling too
        raise


def _start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> APIFuture[T]:
    """Run ``coro`` on ``loop``: a task when called on the loop's own thread, else handed over."""
    if on_own_thread(loop):
        return APIFuture(loop, loop.create_task(coro))
    return APIFuture(loop, asyncio.run_coroutine_threadsafe(coro, loop))


def submit(
    fn: Callable[Concatenate[S, P], Coroutine[Any, Any, APIFuture[T]]],
    *,
    unordered_after: bool = False,
) -> Callable[Concatenate[S, P], APIFuture[T]]:
    """``x = submit(x_async)``: start a submission on the client's loop, return an APIFuture of its result.

    Returns without waiting for the POST: the coroutine reserves its sequence id as soon as the loop starts
    it, and the loop starts coroutines in the order they were handed over. On the client's own loop thread
    the plain form raises (a task would reserve its id only at the loop's next turn, after coroutines called
    later), unless ``unordered_after``: a call whose order relative to *later* calls cannot matter
    (``unload_model`` ends the run) is then scheduled there as a task.
    """

    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> APIFuture[T]:
        loop = self._binding.for_sync(f"{type(self).__name__}.{_name(fn)}", own_thread=unordered_after)
        return _start(loop, _then(fn(self, *args, **kwargs)))

    mark_sync_form(fn, wrapper)
    return wrapper


def on_client_loop(
    fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Decorate a coroutine method so that it always runs on the client's loop.

    On the client's loop (the usual case) it runs directly, without an extra ``await`` before its body, so
    sequence ids are still reserved at call time. Awaited on another loop, it runs on the client's loop and
    the caller awaits the outcome (cancellation is passed on).
    """

    @functools.wraps(fn)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        loop = self._binding.for_async()
        if loop is asyncio.get_running_loop():
            return await fn(self, *args, **kwargs)
        if not loop.is_running():
            raise RuntimeError("this client is bound to an event loop that is not running")
        cf: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(fn(self, *args, **kwargs), loop)
        return await asyncio.wrap_future(cf)

    return wrapper
