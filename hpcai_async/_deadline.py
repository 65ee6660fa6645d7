"""Deadlines that a caller sets on a whole operation (the ``timeout=`` of ``load_state*`` and
``create_training_client_from_state*``, Tinkex's ``await_timeout``): unbounded by default.

One ``Deadline`` is made when the operation is called; every wait of the operation is ``bound`` by it, so
the operation as a whole ends within ``timeout`` seconds, raising ``APITimeoutError`` (a ``TimeoutError``).
A wait cut short is cancelled; what the operation already sent stays sent (the server runs it).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import TypeVar

from ._errors import APITimeoutError, ConfigurationError

__all__ = ("Deadline",)

T = TypeVar("T")


class Deadline:
    """``timeout`` seconds from now for ``what`` (None: no deadline)."""

    __slots__ = ("_at", "timeout", "what")

    def __init__(self, timeout: float | None, what: str) -> None:
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf
        ):
            raise ConfigurationError(
                f"timeout: must be a positive number of seconds, or None to wait as long as it takes; "
                f"got {timeout!r:.50}"
            )
        self.timeout = timeout
        self.what = what
        self._at = None if timeout is None else time.monotonic() + timeout

    @property
    def bounded(self) -> bool:
        return self._at is not None

    def remaining(self) -> float | None:
        """Seconds left (at least 0), or None without a deadline."""
        return None if self._at is None else max(0.0, self._at - time.monotonic())

    def error(self) -> APITimeoutError:
        return APITimeoutError(f"{self.what} did not finish within timeout={self.timeout:g} s")

    async def bound(self, awaitable: Awaitable[T]) -> T:
        """``await awaitable`` within the deadline: past it, the wait is cancelled and ``error()`` raised.

        A ``TimeoutError`` of the awaitable's own (a request's read timeout) is raised as it is."""
        remaining = self.remaining()
        if remaining is None:
            return await awaitable
        scope = asyncio.timeout(remaining)
        try:
            async with scope:
                return await awaitable
        except TimeoutError:
            if scope.expired():
                raise self.error() from None
            raise
