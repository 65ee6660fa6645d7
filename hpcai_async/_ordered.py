"""One run's requests in call order: numbers, seq_ids or turns, sending, release of unsent numbers, results.

A TrainingClient makes each request through ``RunRequests``: ``seq.reserve`` takes its number at call time
(``_sequence``), ``submit`` sends it (with its seq_id at once, or on its turn: then from the caller's task
when the turn is already there) and polls for its result, and whatever stops a reserved request from being
sent gives its number back at once (``release``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

import msgspec

from ._errors import NotFoundError
from ._futures import APIFuture, QueueState
from ._http import Transport
from ._sequence import Sequencer
from .types import (
    ForwardBackwardRequest,
    ForwardRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    ModelIdRequest,
    OptimStepRequest,
    SaveWeightsRequest,
    UntypedAPIFuture,
)

__all__ = ("Body", "RunRequests", "Started")

T = TypeVar("T")

# The extension flag that makes load_weights restore (or not) the optimizer state (PROTOCOL.md §8.7).
_OPTIMIZER_FEATURE = "load_optimizer"

Body: TypeAlias = (
    ForwardRequest
    | ForwardBackwardRequest
    | OptimStepRequest
    | ModelIdRequest
    | SaveWeightsRequest
    | LoadWeightsRequest
)


class RunRequests:
    """The requests of one TrainingClient to its run, in call order."""

    def __init__(
        self,
        transport: Transport,
        model_id: str,
        *,
        first_seq_id: int | None,
        on_queue_state: Callable[[str | QueueState], None],
    ) -> None:
        self.transport = transport
        self.model_id = model_id
        self._index = transport.training_client_index()
        self.seq = Sequencer()
        # seq_id of request 0: 1 for a run this client created; None for a run it attached to, whose
        # sequence goes on from get_info's next_seq_id (read once, before the first request)
        self.first_seq_id = first_seq_id
        self._first_seq_task: asyncio.Task[int] | None = None
        self._on_queue_state = on_queue_state

    def key(self, n: int) -> str:
        return f"{self.transport.session_id}:{self._index}:{n}"

    async def first_seq(self) -> int:
        """The seq_id of request 0: the run's ``next_seq_id`` when attached to an existing run."""
        if self.first_seq_id is not None:
            return self.first_seq_id
        task = self._first_seq_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._first_seq_task = asyncio.get_running_loop().create_task(self._read_next_seq())
        first = await asyncio.shield(task)
        self.first_seq_id = first
        return first

    async def _read_next_seq(self) -> int:
        body = ModelIdRequest(model_id=self.model_id)  # no seq_id: asks where the run's sequence is
        info = await self.transport.request("POST", "get_info", GetInfoResponse, body=body)
        return info.next_seq_id if info.next_seq_id is not None else 1

    def abandon(self, first: int, count: int) -> None:
        """Reserved numbers whose requests will never be sent: give them back at once (``release``)."""
        for n in range(first, first + count):
            self.release(n)

    def release(self, n: int) -> None:
        """Number ``n`` will not be sent: the client goes on, and a seq_id server skips it at once.

        The server is told with ``POST release_seq`` (contract of the "seq_id" extension); a server without
        that route gets a ``get_info`` carrying the seq_id, a no-op that takes its turn.
        """
        self.seq.abandon(n)
        first = self.first_seq_id
        if not self.transport.seq_mode or first is None or self.transport.closed:
            return
        try:
            filler = self.transport.spawn(self._release_seq(first + n))
        except RuntimeError:  # no running loop (the client's loop is gone): nothing to tell
            return
        filler.add_done_callback(_ignore_outcome)

    async def _release_seq(self, seq_id: int) -> None:
        try:
            await self.transport.call(
                "POST", "release_seq", body={"model_id": self.model_id, "seq_id": seq_id}
            )
        except NotFoundError:  # a server from before release_seq: fill the hole with a no-op in its turn
            body = ModelIdRequest(model_id=self.model_id, seq_id=seq_id)
            await self.transport.request("POST", "get_info", GetInfoResponse, body=body)

    async def send(self, n: int, path: str, body: Body, result: type[T]) -> T:
        """POST request ``n``: with its seq_id at once (within the window), or on its turn.

        Whatever stops it from being sent -- an error while preparing or encoding it, a final error answer,
        cancellation -- releases its number at once, so the requests after it never wait for it.
        """
        try:
            answer, seq_mode = await self._post(n, path, body, result)
        except BaseException:
            self.release(n)
            raise
        return self._sent(n, answer, seq_mode, result)

    async def _post(self, n: int, path: str, body: Body, result: type[T]) -> tuple[T, bool]:
        features = await self.transport.features()
        if isinstance(body, LoadWeightsRequest) and _OPTIMIZER_FEATURE not in features:
            body.optimizer = msgspec.UNSET  # the official protocol has no such field
        headers = self.transport.submit_headers if result is UntypedAPIFuture else None
        seq_mode = "seq_id" in features
        if seq_mode:
            body.seq_id = await self.first_seq() + n
            await self.seq.wait_window(n)
        else:
            await self.seq.wait_turn(n)
        answer = await self.transport.request(
            "POST", path, result, body=body, key=self.key(n), headers=headers, batch=seq_mode
        )
        return answer, seq_mode

    def _sent(self, n: int, answer: T, seq_mode: bool, result: type[Any]) -> T:
        if not seq_mode:
            self.seq.end_turn(n)
        if result is not UntypedAPIFuture:  # the answer is the result (get_info): nothing to poll
            self.seq.finish(n)
        return answer

    def start(
        self,
        n: int,
        path: str,
        body: Body,
        result: type[T],
        request_type: str,
        combine: Callable[[list[T]], Any] | None = None,
    ) -> Started[Any]:
        """Start sending request ``n`` and, once it is acknowledged, polling for its result (``combine([it])``
        if given)."""
        submission = self.transport.spawn(self.send(n, path, body, UntypedAPIFuture), name=f"{path} #{n}")
        polling = self._outcome(n, submission, result, request_type, time.monotonic(), combine)
        return Started(submission, self.transport.spawn(polling))

    async def submit(
        self,
        first: int,
        path: str,
        bodies: Sequence[Body],
        result: type[T],
        request_type: str,
        combine: Callable[[list[T]], Any] | None = None,
    ) -> asyncio.Future[Any]:
        """Send requests ``first``, ``first + 1``, ... (one per body) and poll for their results.

        Returns the future of the result (``combine`` of the results, if given) once every POST was answered
        (turn mode) or is on its way (seq_id mode).

        Turn mode, on the request's turn (the usual case): its POST goes from the caller's task at once, as a
        bare script would send it, and only the polling is a task. If the caller is cancelled meanwhile, that
        request and the ones after it are left to tasks of their own (``start``): the one in flight is sent
        again with the same key, as a retry would be, so a called request is still sent, in its turn.
        """
        single = combine if len(bodies) == 1 else None  # one request: its poll task combines
        if not self.transport.seq_mode:  # turn mode, or not known yet (the first request)
            try:
                await self.transport.features()
            except asyncio.CancelledError:
                self._start_all(first, path, bodies, result, request_type, single)
                raise
            except Exception as exc:  # what each request would meet: none can be sent
                self.abandon(first, len(bodies))
                return _failed(exc)
        outcomes: list[asyncio.Future[Any]]
        if self.transport.seq_mode:
            outcomes = [s.outcome for s in self._start_all(first, path, bodies, result, request_type, single)]
        else:
            outcomes = await self._send_in_turn(first, path, bodies, result, request_type, single)
        if len(bodies) == 1:
            return outcomes[0]
        return self.transport.spawn(_combined(outcomes, combine))

    async def _send_in_turn(
        self,
        first: int,
        path: str,
        bodies: Sequence[Body],
        result: type[T],
        request_type: str,
        combine: Callable[[list[T]], Any] | None,
    ) -> list[asyncio.Future[Any]]:
        """Turn mode: each POST from the caller's task while it is the request's turn; the rest (behind a
        request still on its way) go as tasks, and this waits for their POSTs. The futures of the results."""
        outcomes: list[asyncio.Future[Any]] = []
        for i, body in enumerate(bodies):
            n = first + i
            if not self.seq.has_turn(n):
                rest = self._start_all(n, path, bodies[i:], result, request_type, combine)
                await self.submitted(rest)
                return outcomes + [s.outcome for s in rest]
            try:
                outcomes.append(await self._send_now(n, path, body, result, request_type, combine))
            except asyncio.CancelledError:
                self._start_all(n, path, bodies[i:], result, request_type, combine)
                raise
            except BaseException:  # KeyboardInterrupt, SystemExit: the ones after it go back too
                self.abandon(n + 1, len(bodies) - i - 1)
                raise
        return outcomes

    def _start_all(
        self,
        first: int,
        path: str,
        bodies: Sequence[Body],
        result: type[T],
        request_type: str,
        combine: Callable[[list[T]], Any] | None = None,
    ) -> list[Started[Any]]:
        return [
            self.start(first + i, path, body, result, request_type, combine) for i, body in enumerate(bodies)
        ]

    async def _send_now(
        self,
        n: int,
        path: str,
        body: Body,
        result: type[T],
        request_type: str,
        combine: Callable[[list[T]], Any] | None,
    ) -> asyncio.Future[Any]:
        """Turn mode: POST request ``n`` on the caller's task; the task polling for its result, or the failed
        future of a request that could not be sent (its number released)."""
        started = time.monotonic()
        try:
            answer, seq_mode = await self._post(n, path, body, UntypedAPIFuture)
        except asyncio.CancelledError:
            raise  # not released: the caller hands it to a task (``submit``)
        except Exception as exc:
            self.release(n)
            return _failed(exc)
        except BaseException:
            self.release(n)
            raise
        submitted = self._sent(n, answer, seq_mode, UntypedAPIFuture)
        return self.transport.spawn(self._outcome(n, submitted, result, request_type, started, combine))

    async def _outcome(
        self,
        n: int,
        submission: asyncio.Task[UntypedAPIFuture] | UntypedAPIFuture,
        result: type[T],
        request_type: str,
        started: float,
        combine: Callable[[list[T]], Any] | None = None,
    ) -> Any:
        try:
            if isinstance(submission, UntypedAPIFuture):
                future = submission
            else:  # cancelling the result never cancels the submission
                future = await asyncio.shield(submission)
            out = await self.transport.poll(
                future.request_id,
                result,
                request_type=request_type,
                model_id=future.model_id or self.model_id,
                roundtrip=time.monotonic() - started,
                inline=future.result,
                on_queue_state=self._on_queue_state,
            )
            return out if combine is None else combine([out])
        finally:
            self.seq.finish(n)  # its result is known (or never will be): the window moves on

    async def submitted(self, started: Sequence[Started[Any]]) -> None:
        """Turn mode: wait until these POSTs were answered. seq_id mode: they are on their way already."""
        if started and not self.transport.seq_mode:
            await asyncio.wait([s.submission for s in started])

    async def reserve(self, count: int, needs: Sequence[str] = (), what: str = "") -> int:
        """Take ``count`` numbers now (call order is execution order); then check that the server has the
        features ``needs`` (for ``what``): if not, the numbers go back and ``UnsupportedFeatureError`` is
        raised, nothing sent."""
        first = self.seq.reserve(count)
        try:
            for feature in needs:
                await self.transport.require(feature, what)
        except BaseException:
            self.abandon(first, count)
            raise
        return first

    async def op(
        self, path: str, body: Body, result: type[T], request_type: str, needs: Sequence[str] = ()
    ) -> APIFuture[T]:
        outcome = await self.submit(await self.reserve(1, needs, path), path, [body], result, request_type)
        return APIFuture(asyncio.get_running_loop(), outcome)

    async def acknowledged(self, path: str, body: Body, result: type[T], request_type: str) -> None:
        """Send a request in turn and return once the server has acknowledged it (queued it), without
        waiting for its result, which nobody will read (an unload that must not wait for a slow job)."""
        started = self.start(await self.reserve(1), path, body, result, request_type)
        started.outcome.add_done_callback(_ignore_outcome)
        await asyncio.shield(started.submission)


class Started(Generic[T]):
    """A request under way: the task sending it and the task waiting for its result."""

    __slots__ = ("outcome", "submission")

    def __init__(self, submission: asyncio.Task[UntypedAPIFuture], outcome: asyncio.Task[T]) -> None:
        self.submission = submission
        self.outcome = outcome


async def _combined(outcomes: Sequence[asyncio.Future[T]], combine: Callable[[list[T]], Any] | None) -> Any:
    results = list(await asyncio.gather(*outcomes))
    return results if combine is None else combine(results)


def _failed(exc: Exception) -> asyncio.Future[Any]:
    failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    failed.set_exception(exc)
    return failed


def _ignore_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed filler changes nothing for the caller
