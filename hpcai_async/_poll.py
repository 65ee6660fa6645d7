"""The long-poll state machine: ``retrieve_future`` until a future has its result (PROTOCOL.md §3.2-3.3).

A poll goes again at once after a server long-poll. After a quick ``try_again`` (a server that does not hold
polls) it goes again at once for the first few milliseconds, as tinker's client always does, so a short job's
result is there a round trip after it is done; then it pauses about a tenth of the time waited so far (at
most 1 s), so the added latency stays within ~10 % and such a server sees a few polls per second of a long
job, not one per round trip. A ``try_again`` or a 408 ("still queued") is
progress for the retry budget; connection errors, 429 and 5xx spend it; any other status ends the poll.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec

from . import _retry, _wire
from ._errors import APIError, APIStatusError, RequestFailedError, error_for_status
from ._exchange import describe
from ._wire import Answer, Request
from .types import FutureRetrieveRequest

__all__ = ("POLL_READ_TIMEOUT", "Poller")

T = TypeVar("T")

POLL_READ_TIMEOUT = 45.0  # s, the official client's retrieve_future timeout (§3.2)
POLL_AT_ONCE = 0.005  # s: after a quick try_again, poll again at once while waited less than this; then ...
POLL_PAUSE_FRACTION = 0.1  # ... pause this share of the time waited so far ...
POLL_PAUSE_MIN = 0.001  # ... but at least 1 ms ...
POLL_PAUSE_MAX = 1.0  # ... and at most 1 s


class _Probe(msgspec.Struct):
    """The fields that tell a retrieve_future answer apart: try_again, an error, or the result."""

    type: Any = None
    error: Any = None
    message: Any = None
    queue_state: Any = None


class Poller:
    """Polls futures through one ``send`` seam; keeps the round-trip estimate that tells long-polls apart."""

    def __init__(
        self, retryable: tuple[type[BaseException], ...], read_timeout: float = POLL_READ_TIMEOUT
    ) -> None:
        self.retryable = retryable  # the exceptions of a broken connection (aiohttp's, and timeouts)
        self.read_timeout = read_timeout
        self._rtt = math.inf  # shortest recent retrieve_future round trip

    async def poll(
        self,
        send: Callable[[Request], Awaitable[Answer]],
        request: Request,
        result: type[T],
        budget: _retry.RetryBudget,
        *,
        request_id: str,
        inline: Answer | None = None,
        on_queue_state: Callable[[str], None] | None = None,
        on_headers: Callable[[Mapping[str, str]], None] | None = None,
    ) -> T:
        """Poll with ``request`` until the result is there; ``inline``: the submit's answer carried it.
        ``on_headers`` is given the headers of the answer that carries the result."""
        start = time.monotonic()
        headers = dict(request.headers)
        iteration = 0
        while True:
            headers[_wire.REQUEST_ITERATION] = str(iteration)
            if iteration == 1:
                headers.pop(_wire.ROUNDTRIP, None)
            iteration += 1
            sent = time.monotonic()
            hint: float | None = None
            try:
                if inline is not None:
                    answer, inline = inline, None
                else:
                    answer = await send(request._replace(headers=dict(headers)))
            except self.retryable as exc:
                failure, status = describe(exc), None
            else:
                status = answer.status
                if status == 200 or status == 408:
                    probe = (
                        _wire.decode(answer.payload, answer.content_type, _Probe)
                        if status == 200
                        else _STILL_QUEUED
                    )
                    if probe.type != "try_again":
                        budget.progress()
                        if on_headers is not None:
                            on_headers(answer.headers)
                        return _result(answer, probe, result, request_id)
                    budget.progress()
                    if on_queue_state is not None and isinstance(probe.queue_state, str):
                        on_queue_state(probe.queue_state)
                    if probe.queue_state != "batch":  # "batch": another poll of its batch was answered
                        await self._pause(start, sent)
                    continue
                failure, hint = _failure(answer, request_id)
            try:
                delay = budget.failed(failure, status, hint)
            except APIError as exc:
                exc.request_id = request_id
                raise
            await asyncio.sleep(delay)

    async def _pause(self, start: float, sent: float) -> None:
        """Re-poll at once after a long-poll, and after a quick answer in the first ``POLL_AT_ONCE``; later
        wait ~10 % of the time waited so far.

        A poll the server held (a long-poll) took clearly longer than the round trip, which is estimated as
        the shortest poll seen lately.
        """
        now = time.monotonic()
        took = now - sent
        self._rtt = min(took, self._rtt * 1.05 + 1e-4)  # lets the estimate rise again if the path slows
        if now - start < POLL_AT_ONCE:
            return
        pause = min(max(POLL_PAUSE_FRACTION * (now - start), POLL_PAUSE_MIN), POLL_PAUSE_MAX)
        pause *= random.uniform(0.8, 1.2)
        if took - self._rtt < pause:  # the server did not hold the request
            await asyncio.sleep(pause)


def poll_request(
    request_id: str,
    model_id: str | None,
    *,
    msgpack: bool,
    request_type: str,
    key: str,
    roundtrip: float | None,
    read_timeout: float,
) -> Request:
    """The ``retrieve_future`` request for one future (its headers are the same on every poll)."""
    data, content_type = _wire.encode(
        FutureRetrieveRequest(request_id=request_id, model_id=model_id or msgspec.UNSET), msgpack
    )
    headers = {"Content-Type": content_type, _wire.IDEMPOTENCY_KEY: key, _wire.REQUEST_TYPE: request_type}
    if msgpack:
        headers["Accept"] = _wire.ACCEPT_MSGPACK
    if roundtrip is not None:
        headers[_wire.ROUNDTRIP] = f"{roundtrip:.6f}"
    return Request("POST", "retrieve_future", data, headers, read_timeout=read_timeout)


# A 408 is "still queued" (the official server's long-poll timeout): poll again, as after a try_again.
_STILL_QUEUED = _Probe(type="try_again")


def _result(answer: Answer, probe: _Probe, result: type[T], request_id: str) -> T:
    """A finished future's answer: the result, or ``RequestFailedError`` for a job that failed."""
    if probe.error is not None:
        message = probe.message if isinstance(probe.message, str) else str(probe.error)
        raise RequestFailedError(message, code=str(probe.error), request_id=request_id)
    return _wire.decode(answer.payload, answer.content_type, result)


def _failure(answer: Answer, request_id: str) -> tuple[str, float | None]:
    """A retryable error answer (429, 5xx) as (failure, Retry-After); any other status raises its error."""
    status = answer.status
    message, code = _wire.parse_error_body(answer.payload, answer.content_type)
    if status != 429 and status < 500:
        cls: type[APIStatusError] = error_for_status(status, code)
        raise cls(
            f"retrieve_future: HTTP {status}: {message}", status=status, code=code, request_id=request_id
        )
    return f"HTTP {status} ({message})", _retry.retry_after(answer.headers)
