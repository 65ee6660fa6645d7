"""Concurrency controllers: how many sampling requests a client keeps in flight at once.

A controller hands out slots (``async with controller.slot() as slot``); a request holds its slot from its
submit until its result (retries and backpressure waits included), so ``window`` bounds the samples that
are on the server at any moment. Two kinds, as in Fireworks' training SDK:

* ``FixedConcurrencyController(max_concurrency)``: a semaphore of a fixed size, for when the right
  concurrency is known (it is also what ``RetryConfig.max_connections`` sets up);
* ``AdaptiveConcurrencyController(initial_window, min_window, max_window, ...)``: AIMD on the server's
  queue signal -- the window grows while samples wait little in the server's queue and halves when they wait
  too long or the server answers 429.

One controller may be shared by several samplers, also of different ServiceClients and event loops (it is
thread-safe and binds to no loop), so one budget covers every sampler that shares it. A controller pickles
as a fresh controller with the same settings (an adaptive one starting from its current window): its slots
belong to the process that holds them.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
from types import TracebackType
from typing import Any

from ._errors import ConfigurationError

__all__ = (
    "AdaptiveConcurrencyController",
    "ConcurrencyController",
    "FixedConcurrencyController",
    "Slot",
)


class Slot:
    """One request's place in a controller's window; report what the server said about it here."""

    __slots__ = ("_controller", "_held", "generation", "queue_s")

    def __init__(self, controller: ConcurrencyController) -> None:
        self._controller = controller
        self._held = False
        self.generation = 0  # the controller's generation when the slot was taken (see the adaptive one)
        self.queue_s: float | None = None  # the last queue duration the server reported for this request

    async def __aenter__(self) -> Slot:
        await self._controller._acquire(self)
        self._held = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._held:
            self._held = False
            self._controller._release(self, ok=exc_type is None)

    def queued(self, seconds: float) -> None:
        """The server says this request waited ``seconds`` in its queue before its engine started it."""
        self.queue_s = seconds

    def throttled(self) -> None:
        """The server turned this request away for now (429, or a "paused_rate_limit" queue state)."""
        with self._controller._lock:
            self._controller._on_throttled(self)


class ConcurrencyController:
    """At most ``window`` requests in flight; ``slot()`` is one place. Subclasses decide how ``window``
    moves (``_on_done``, ``_on_throttled``, called with the lock held)."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._lock = threading.Lock()  # the state is shared by every loop and thread that uses the controller

    @property
    def window(self) -> int:
        """How many requests may be in flight now (read-only; an adaptive controller moves it)."""
        return self._window

    @property
    def in_flight(self) -> int:
        """How many requests hold a slot now."""
        return self._in_flight

    def slot(self) -> Slot:
        """A place in the window: ``async with controller.slot() as slot:`` waits until there is room."""
        return Slot(self)

    def settings(self) -> dict[str, Any]:
        """The constructor arguments of an equivalent fresh controller (what a pickle carries)."""
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.settings()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self._window}, in_flight={self._in_flight})"

    # ------------------------------------------------------------------------------------------- slots

    async def _acquire(self, slot: Slot) -> None:
        with self._lock:
            slot.generation = self._generation()
            if self._in_flight < self._window and not self._waiters:
                self._in_flight += 1
                return
            self._on_wait()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            with self._lock:
                try:
                    self._waiters.remove(waiter)  # still waiting: nothing to give back
                except ValueError:
                    self._in_flight -= 1  # it was granted a place just as it was cancelled: give it back
                    self._grant()
            raise
        with self._lock:
            slot.generation = self._generation()  # the window it runs under

    def _release(self, slot: Slot, ok: bool) -> None:
        with self._lock:
            self._in_flight -= 1
            self._on_done(slot, ok)
            self._grant()

    def _grant(self) -> None:
        """Wake waiters while there is room (each on its own loop, which may be another thread's)."""
        while self._waiters and self._in_flight < self._window:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while queued
                continue
            try:
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # its loop is closed: nobody waits there any more
                continue
            self._in_flight += 1

    # ------------------------------------------------------------------------------------------- policy

    def _generation(self) -> int:
        return 0

    def _on_wait(self) -> None:
        """A request found the window full."""

    def _on_done(self, slot: Slot, ok: bool) -> None:
        """A request gave its slot back (``ok``: it ended with a result)."""

    def _on_throttled(self, slot: Slot) -> None:
        """The server throttled a request holding ``slot``."""


class FixedConcurrencyController(ConcurrencyController):
    """A semaphore: at most ``max_concurrency`` requests in flight, whatever the server says."""

    def __init__(self, max_concurrency: int) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        super().__init__(max_concurrency)
        self.max_concurrency = max_concurrency

    def settings(self) -> dict[str, Any]:
        return {"max_concurrency": self.max_concurrency}


DEFAULT_TARGET_QUEUE_LATENCY = 0.5  # s a sample may wait in the server's queue before the window shrinks
DEFAULT_INCREASE_STEP = 1  # requests added to the window per round without congestion (AIMD's additive step)
DEFAULT_DECREASE_FACTOR = 0.5  # the window is multiplied by this on congestion (TCP's halving)


class AdaptiveConcurrencyController(ConcurrencyController):
    """AIMD on the server's queue signal: the window starts at ``initial_window`` and moves within
    [``min_window``, ``max_window``].

    It adjusts once per *round*: a round ends when as many requests as the window holds have returned
    results (about one round trip of the whole window, as TCP grows once per round trip). At the end of a
    round, if the mean queue duration the server reported for them is above ``target_queue_latency``
    (seconds it waited before the engine started it; default 0.5 s: beyond that, more requests only add
    waiting, the engine is saturated) the window is multiplied by ``decrease_factor`` (0.5); otherwise it
    grows by ``increase_step`` (1) -- but only if the window was the limit in that round (a request had to
    wait for a slot), so a client that sends little does not inflate it. A 429 (the sampling backpressure
    answer, or a ``paused_rate_limit`` queue state) shrinks it at once by the same factor.

    After a decrease, what requests taken under the old window report (their 429s, their queue durations)
    is ignored: they were sent before the cut, and counting them would cut again for the same congestion.

    The queue signal is the local server's ``X-Queue-Duration-Ms`` header (feature ``"queue_duration"``).
    The hosted service sends none: there the controller reacts only to 429s (and grows by rounds of results
    while it has no 429). ``window`` is the current window (read-only).
    """

    def __init__(
        self,
        initial_window: int = 16,
        min_window: int = 1,
        max_window: int = 256,  # the local server's largest sampling batch (Scheduler.max_batch_sequences)
        *,
        target_queue_latency: float = DEFAULT_TARGET_QUEUE_LATENCY,
        increase_step: int = DEFAULT_INCREASE_STEP,
        decrease_factor: float = DEFAULT_DECREASE_FACTOR,
    ) -> None:
        ints = {"initial_window": initial_window, "min_window": min_window, "max_window": max_window}
        ints["increase_step"] = increase_step
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        if not min_window <= initial_window <= max_window:
            raise ConfigurationError(
                f"need min_window <= initial_window <= max_window, got {min_window}, {initial_window}, "
                f"{max_window}"
            )
        if not (isinstance(target_queue_latency, int | float) and math.isfinite(target_queue_latency)):
            raise ConfigurationError(f"target_queue_latency must be a number, got {target_queue_latency!r}")
        if target_queue_latency < 0 or not 0 < decrease_factor < 1:
            raise ConfigurationError(
                f"target_queue_latency must be >= 0 s and decrease_factor in (0, 1); got "
                f"{target_queue_latency}, {decrease_factor}"
            )
        super().__init__(initial_window)
        self.min_window = min_window
        self.max_window = max_window
        self.target_queue_latency = float(target_queue_latency)
        self.increase_step = increase_step
        self.decrease_factor = float(decrease_factor)
        self._gen = 0  # bumped by every decrease
        self._round_done = 0  # results of the current generation in this round
        self._round_queue: list[float] = []  # their queue durations, where the server sent one
        self._limited = False  # a request had to wait for a slot during this round

    def settings(self) -> dict[str, Any]:
        return {
            "initial_window": self._window,
            "min_window": self.min_window,
            "max_window": self.max_window,
            "target_queue_latency": self.target_queue_latency,
            "increase_step": self.increase_step,
            "decrease_factor": self.decrease_factor,
        }

    def _generation(self) -> int:
        return self._gen

    def _on_wait(self) -> None:
        self._limited = True

    def _on_done(self, slot: Slot, ok: bool) -> None:
        if not ok or slot.generation != self._gen:
            return
        self._round_done += 1
        if slot.queue_s is not None:
            self._round_queue.append(slot.queue_s)
        if self._round_done < self._window:
            return
        queue = self._round_queue
        if queue and sum(queue) / len(queue) > self.target_queue_latency:
            self._decrease()
            return
        if self._limited:
            self._window = min(self.max_window, self._window + self.increase_step)
        self._new_round()

    def _on_throttled(self, slot: Slot) -> None:
        if slot.generation == self._gen:
            self._decrease()

    def _decrease(self) -> None:
        self._window = max(
            self.min_window, min(self._window - 1, math.floor(self._window * self.decrease_factor))
        )
        self._gen += 1
        self._new_round()

    def _new_round(self) -> None:
        self._round_done = 0
        self._round_queue = []
        self._limited = self._in_flight >= self._window or bool(self._waiters)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _rebuild(cls: type[ConcurrencyController], settings: dict[str, Any]) -> ConcurrencyController:
    return cls(**settings)
