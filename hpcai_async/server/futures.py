"""Futures on the server: each request's record, its result's retention and expiry, and long-poll waits.

A ``Record`` is created when a request is accepted and answers ``retrieve_future`` until it expires. Results
are kept ``retention_s`` after completion, or ``delivered_retention_s`` (5 min) after they were first handed
out if that comes sooner: long enough for a client to fetch again an answer lost on the way, short enough
that a training loop does not pile up every logprob tensor of the last hour. An expired id answers 410 (a
bounded set of expired ids tells them apart from ids never issued, which answer 404). Idempotency keys are
remembered as long as their record is.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .. import types
from .._errors import APIError, GoneError, NotFoundError

__all__ = ("Futures", "Record", "error_response")

log = logging.getLogger("hpcai_async.server")

_EXPIRED_IDS_KEPT = 100_000  # ids told apart as "expired" (410) rather than "unknown" (404): ~4 MB at most


def error_response(exc: BaseException) -> types.ErrorResponse:
    """The ``{error, message}`` of an exception: API errors by class name, bad values as BadRequestError."""
    if isinstance(exc, APIError):
        return types.ErrorResponse(error=type(exc).__name__, message=exc.message, code=exc.code)
    if isinstance(exc, ValueError | LookupError | TypeError):
        return types.ErrorResponse(error="BadRequestError", message=_text(exc) or type(exc).__name__)
    return types.ErrorResponse(error="InternalServerError", message=f"{type(exc).__name__}: {_text(exc)}")


def _text(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` fails (its future must still finish)."""
    try:
        return str(exc)
    except Exception:
        return f"(the {type(exc).__name__} could not be shown)"


@dataclass(eq=False, slots=True)
class Record:
    """A future: one submitted request and, once done, its result or error."""

    request_id: str
    kind: str
    model_id: str | None
    fingerprint: bytes
    idem_key: str | None = None
    seq_id: int | None = None
    result: Any = None
    error: types.ErrorResponse | None = None
    created_at: float = 0.0
    started_at: float | None = None  # when the engine started it (sampling batches; loop time)
    finished_at: float | None = None
    delivered_at: float | None = None  # first time retrieve_future handed the result out
    waiters: set[asyncio.Future[bool]] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def queued_s(self) -> float | None:
        """Seconds it waited in the server's queue before the engine started it (None: not recorded)."""
        return None if self.started_at is None else max(0.0, self.started_at - self.created_at)


class Futures:
    """The records of one server (the base of ``Scheduler``, which runs them); called on the server loop."""

    def __init__(self, *, retention_s: float, delivered_retention_s: float) -> None:
        self.retention_s = retention_s
        self.delivered_retention_s = delivered_retention_s
        self._records: dict[str, Record] = {}
        self._by_key: dict[str, Record] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._waiters: set[asyncio.Future[bool]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    def wake_all(self) -> None:
        """Answer every long-poll now (they see 'not done': try_again): the server is shutting down."""
        self.closing = True
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(False)

    def _new_record(
        self, kind: str, model_id: str | None, fingerprint: bytes, idem_key: str | None
    ) -> Record:
        record = Record(request_id=str(uuid.uuid4()), kind=kind, model_id=model_id, fingerprint=fingerprint)
        record.created_at = self._now()
        self._records[record.request_id] = record
        if idem_key:
            record.idem_key = idem_key
            self._by_key[idem_key] = record
        return record

    def get(self, request_id: str) -> Record:
        """The record of ``request_id``; NotFoundError if never issued, GoneError if its result expired."""
        record = self._records.get(request_id)
        if record is not None and self._expired_now(record, self._now()):
            self._expire(record)
            record = None
        if record is None:
            if request_id in self._expired:
                raise GoneError(
                    f"the result of request {request_id!r} expired: results are kept {self.retention_s:g} s "
                    "after they complete; submit the request again"
                )
            raise NotFoundError(
                f"unknown request_id {request_id!r}: no request with this id was submitted to this server "
                "(or the server restarted since); submit the request again"
            )
        return record

    async def wait(
        self,
        record: Record,
        timeout: float | None,  # noqa: ASYNC109 (a long-poll's own deadline, not a call timeout)
        until: asyncio.Event | None = None,
    ) -> bool:
        """Wait until ``record`` is done (True) or ``timeout`` passes, ``until`` is set, or the server shuts
        down (False). Cancelling the wait leaves nothing behind."""
        if record.finished_at is not None:
            return True
        if self.closing or (until is not None and until.is_set()):
            return False
        assert self._loop is not None
        waiter: asyncio.Future[bool] = self._loop.create_future()
        record.waiters.add(waiter)
        self._waiters.add(waiter)
        handle = None if timeout is None else self._loop.call_later(timeout, _resolve, waiter, False)
        stopper = None if until is None else asyncio.ensure_future(until.wait())
        if stopper is not None:
            stopper.add_done_callback(lambda _: _resolve(waiter, False))
        try:
            return await waiter
        finally:
            if handle is not None:
                handle.cancel()
            if stopper is not None:
                stopper.cancel()
            record.waiters.discard(waiter)
            self._waiters.discard(waiter)

    def _finish(self, record: Record, outcome: Any) -> None:
        if record.finished_at is not None:
            return
        if isinstance(outcome, BaseException):
            record.error = error_response(outcome)
            if not isinstance(outcome, APIError | ValueError | LookupError | TypeError):
                log.error("request %s (%s) failed", record.request_id, record.kind, exc_info=outcome)
        else:
            record.result = outcome
        record.finished_at = self._now()
        for waiter in record.waiters:
            _resolve(waiter, True)

    def _expired_now(self, record: Record, now: float) -> bool:
        if record.finished_at is None:
            return False
        if record.delivered_at is not None and now - record.delivered_at > self.delivered_retention_s:
            return True
        return now - record.finished_at > self.retention_s

    def delivered(self, record: Record) -> None:
        """``record``'s result was handed out: from now on it is kept only ``delivered_retention_s``."""
        if record.delivered_at is None:
            record.delivered_at = self._now()

    def _expire(self, record: Record) -> None:
        self._records.pop(record.request_id, None)
        self._expired[record.request_id] = None
        while len(self._expired) > _EXPIRED_IDS_KEPT:
            self._expired.popitem(last=False)
        if record.idem_key and self._by_key.get(record.idem_key) is record:
            del self._by_key[record.idem_key]
        self._forget(record)

    def _forget(self, record: Record) -> None:
        """``record`` expired: drop what else refers to it (the scheduler's per-model seq_ids)."""

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _expire_due(self) -> None:
        now = self._now()
        for record in [r for r in self._records.values() if self._expired_now(r, now)]:
            self._expire(record)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
