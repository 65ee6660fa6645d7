"""The batcher: requests made while others are on the wire go together in one ``POST batch`` (extension).

A request goes out at once, on its own, while fewer than ``slots`` requests or batches are on the wire.
Otherwise it waits, and when a slot frees, everything that waited goes together (up to 256 requests and
1 MiB). A lone call pays nothing; a burst (a pipelined training loop, thousands of concurrent samples) costs a
few HTTP round trips instead of one per request. Each request keeps its own idempotency key, answer and
retries: a failed batch fails each of its requests, and each retries as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from . import _wire
from ._errors import APIConnectionError, APIError
from ._wire import Answer, Request
from .types import BatchItem, BatchRequest, BatchResponse

__all__ = ("BATCH_MAX_BYTES", "BATCH_SLOTS", "POLL_SLOTS", "Batcher")

BATCH_SLOTS = 2  # requests or batches on the wire at once; what comes meanwhile waits for a free slot ...
BATCH_MAX_ITEMS = 256  # ... and goes with up to this many others ...
BATCH_MAX_BYTES = 1 << 20  # ... in a batch of up to 1 MiB; a bigger body is sent on its own, never queued
POLL_SLOTS = 4  # polls have slots of their own, so polls held by the server never hold up submissions

_Waiting = tuple[BatchItem, int, "asyncio.Future[Answer]"]


class Batcher:
    """Coalesces requests into ``POST batch`` requests, through the session's one ``send`` seam."""

    def __init__(
        self,
        send: Callable[[Request], Awaitable[Answer]],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        *,
        slots: int,
        batch_headers: Callable[[], dict[str, str]],
        msgpack: Callable[[], bool],
    ) -> None:
        self._send = send
        self._spawn = spawn
        self.slots = slots
        self._batch_headers = batch_headers  # the headers of a POST batch (inline wait, Accept)
        self._msgpack = msgpack
        self.busy = 0  # slots in use
        self.closed = False
        self.waiting: list[_Waiting] = []

    async def send(self, request: Request) -> Answer:
        """Send ``request`` (a POST with a body and an idempotency key) alone or in the next batch."""
        assert request.data is not None
        if self.busy < self.slots and not self.waiting:
            self.busy += 1
            try:
                return await self._send(request)
            finally:
                self._release()
        key = request.headers[_wire.IDEMPOTENCY_KEY]
        item = BatchItem(path=request.path, body=msgspec.Raw(request.data), idempotency_key=key)
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.waiting.append((item, len(request.data), answer))
        return await answer

    def _release(self) -> None:
        self.busy -= 1
        if not self.waiting or self.busy >= self.slots or self.closed:
            return
        count, size = 0, 0
        for _, n, _ in self.waiting:
            if count == BATCH_MAX_ITEMS or (count and size + n > BATCH_MAX_BYTES):
                break
            count, size = count + 1, size + n
        batch, self.waiting = self.waiting[:count], self.waiting[count:]
        self.busy += 1
        self._spawn(self._post(batch))

    async def _post(self, batch: list[_Waiting]) -> None:
        try:
            answers = await self._send_batch([item for item, _, _ in batch])
        except asyncio.CancelledError:  # the client is closing
            _fail(batch, APIConnectionError("this ServiceClient is closed"))
            raise
        except Exception as exc:  # a connection error, say: each request retries (or fails) on its own
            _fail(batch, exc)
        else:
            for (_, _, answer), result in zip(batch, answers, strict=True):
                if not answer.done():
                    answer.set_result(result)
        finally:
            self._release()

    async def _send_batch(self, items: list[BatchItem]) -> list[Answer]:
        """``POST batch`` (no retries): the answer of each request, or the batch's own failure for each."""
        data, content_type = _wire.encode(BatchRequest(requests=items), self._msgpack())
        headers = {**self._batch_headers(), "Content-Type": content_type}
        answer = await self._send(Request("POST", "batch", data, headers))
        if answer.status >= 300:
            return [answer] * len(items)
        try:
            decoded = _wire.decoder(BatchResponse, _wire.is_msgpack(answer.content_type))
            responses = decoded.decode(answer.payload).responses
        except msgspec.DecodeError as exc:
            raise APIError(f"unexpected answer from the server to a batch: {exc}") from None
        if len(responses) != len(items):
            raise APIError(f"the server answered {len(responses)} requests of a batch of {len(items)}")
        return [
            Answer(
                r.status,
                bytes(r.body),
                answer.content_type,
                r.headers if r.headers is not msgspec.UNSET else {},
            )
            for r in responses
        ]

    def close(self) -> None:
        """The client is closing: fail what still waits (what is on the wire is cancelled with its task)."""
        self.closed = True
        waiting, self.waiting = self.waiting, []
        _fail(waiting, APIConnectionError("this ServiceClient is closed"))


def _fail(batch: list[_Waiting], exc: Exception) -> None:
    for _, _, answer in batch:
        if not answer.done():
            answer.set_exception(exc)
