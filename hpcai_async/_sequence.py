"""Call order of one TrainingClient: numbers reserved at call time, turn-taking, the window, release.

Every training request takes its number ``n`` (from 0) when it is called, before its first ``await``, so
call order is wire order. Two ways to keep that order on the server (PROTOCOL.md §4.2):

* turn-taking (a server without ``"seq_id"``): request ``n`` is sent once ``n - 1`` was acknowledged or will
  never be sent (``wait_turn`` / ``end_turn``);
* seq_id (our local server): request ``n`` carries ``seq_id = first + n`` and goes at once; the server
  restores the order. ``first`` is 1 for a run this client created, or the run's ``next_seq_id`` for a run
  it attached to, so a second client continues the sequence instead of replaying it. The server refuses ids
  more than ``SEQ_WINDOW`` ahead of the next one it will run, so request ``n`` waits (``wait_window``) until
  every request below ``n - SEQ_WINDOW + 1`` has finished (``finish``).

A number reserved for a request that will not be sent must be given back at once (``abandon``), or the
server waits for it: turn-taking just skips it; with seq_ids the caller tells the server (``release_seq``).
Pure bookkeeping: no I/O, so it is tested without a server.
"""

from __future__ import annotations

import asyncio

__all__ = ("SEQ_WINDOW", "Sequencer")

# The local server's window (server/ordering.py: a seq_id at most this far ahead of the next one to run is
# accepted). The client keeps its requests within it.
SEQ_WINDOW = 1024


class Sequencer:
    """The numbers of one TrainingClient's requests: reserved, sent in turn, finished."""

    def __init__(self, window: int = SEQ_WINDOW) -> None:
        self.window = window
        self._next = 0  # the next number to hand out
        self._turn = 0  # turn mode: the number whose POST may go now
        self._ended: set[int] = set()  # turn mode: numbers whose turn ended before it came
        self._low = 0  # window: every number below this has finished
        self._finished: set[int] = set()  # window: numbers >= _low that finished
        self._turn_waiters: dict[int, asyncio.Future[None]] = {}
        self._window_waiters: dict[int, asyncio.Future[None]] = {}

    @property
    def reserved(self) -> int:
        """How many numbers were handed out."""
        return self._next

    @property
    def idle(self) -> bool:
        """Whether every number handed out has finished (nothing is waiting to be sent or answered)."""
        return self._low == self._next

    def reserve(self, count: int = 1) -> int:
        """Take ``count`` consecutive numbers (synchronously, so call order is wire order); the first."""
        first = self._next
        self._next += count
        return first

    # ----------------------------------------------------------------------------------------- turns

    async def wait_turn(self, n: int) -> None:
        """Turn mode: until every request before ``n`` was sent or abandoned."""
        while self._turn < n:
            await self._wait(self._turn_waiters, n)

    def has_turn(self, n: int) -> bool:
        """Turn mode: whether request ``n`` may go now (every request before it was sent or abandoned)."""
        return self._turn >= n

    def end_turn(self, n: int) -> None:
        """Request ``n`` was sent (or will never be): let the next one go."""
        if n < self._turn:
            return
        self._ended.add(n)
        while self._turn in self._ended:
            self._ended.discard(self._turn)
            self._turn += 1
        _wake(self._turn_waiters, self._turn)

    # ----------------------------------------------------------------------------------------- window

    def in_window(self, n: int) -> bool:
        return n < self._low + self.window

    async def wait_window(self, n: int) -> None:
        """seq_id mode: until ``n`` is within ``window`` of the lowest request not finished."""
        while not self.in_window(n):
            await self._wait(self._window_waiters, n)

    def finish(self, n: int) -> None:
        """Request ``n``'s result is known (or it was released): the window moves past it."""
        if n < self._low:
            return
        self._finished.add(n)
        old = self._low
        while self._low in self._finished:
            self._finished.discard(self._low)
            self._low += 1
        if self._window_waiters:
            for m in range(old + self.window, self._low + self.window):
                _wake(self._window_waiters, m)

    def abandon(self, n: int) -> None:
        """Number ``n`` will never be sent: its turn ends and the window moves past it."""
        self.end_turn(n)
        self.finish(n)

    @staticmethod
    async def _wait(waiters: dict[int, asyncio.Future[None]], n: int) -> None:
        waiter = waiters[n] = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            if waiters.get(n) is waiter:
                del waiters[n]


def _wake(waiters: dict[int, asyncio.Future[None]], n: int) -> None:
    waiter = waiters.get(n)
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
