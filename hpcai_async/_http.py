"""The transport: one aiohttp session per ServiceClient, auth, codecs, retries, and long-polled futures.

Wire rules (PROTOCOL.md §1, §3, §4) live here and nowhere else:

* every request carries ``X-API-Key``, ``Accept`` and ``User-Agent: hpcai_async/<version>``; a non-GET request
  carries an ``X-Idempotency-Key`` that stays the same across its retries;
* connection errors, 408, 409, 429 and 5xx are retried (``x-should-retry`` overrides the status rule) with
  exponential backoff and jitter, or after ``retry-after-ms`` / ``Retry-After`` when the server says so, for
  at most ``retry_timeout`` seconds in all (300 s, as the official client) -> ``RetryBudgetExceededError``;
* a 429 on a sampling request is backpressure: it opens a short window, shared by every sampler of the
  ServiceClient, in which no sampling request is sent;
* futures are polled with ``retrieve_future`` from the moment they exist: at once again after a server
  long-poll, after a pause of about a fifth of the time waited so far when the server answers ``try_again``
  quickly (so the added latency stays within ~20 %), with backoff on failures;
* bodies are JSON, or MessagePack with raw tensor bytes when the server lists ``"msgpack"`` in its
  capabilities;
* with ``"batch"``, training and sampling requests made while two others are on the wire (polls: four) wait
  and go together in one ``POST batch`` (``_Batcher``); with ``"inline_result"`` a submit's answer may carry
  its result.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import math
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict, TypeVar, Unpack

import msgspec

from . import _wire
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    NotFoundError,
    RequestFailedError,
    RetryBudgetExceededError,
    error_for_status,
)
from ._loop import LoopBinding, close_at_exit
from ._version import __version__
from .types import (
    BatchItem,
    BatchRequest,
    BatchResponse,
    FutureRetrieveRequest,
    GetServerCapabilitiesResponse,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = ("DEFAULT_BASE_URL", "Transport")

T = TypeVar("T")

DEFAULT_BASE_URL = "https://www.hpc-ai.com/finetunesdk"  # the HPC-AI README's value (PROTOCOL.md §1.1)
USER_AGENT = f"hpcai_async/{__version__}"
JSON, MSGPACK, ACCEPT_MSGPACK = _wire.JSON, _wire.MSGPACK, _wire.ACCEPT_MSGPACK

CONNECT_TIMEOUT = 5.0  # s, as the official client (PROTOCOL.md §1.4)
POLL_READ_TIMEOUT = 45.0  # s, the official client's retrieve_future timeout (§3.2)
RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx (§1.4)
BACKOFF_BASE = 0.25  # s: first retry after 0.19-0.25 s, doubling ...
BACKOFF_CAP = 10.0  # s: ... up to 10 s (the Stainless layer's cap)
RETRY_AFTER_MAX = 60.0  # s: a Retry-After beyond this is ignored, as in the official client
SAMPLE_BACKOFF = 1.0  # s: the sampling backpressure window after a 429 without Retry-After (§6.6)
POLL_PAUSE_FRACTION = 0.2  # pause after a quick try_again: this share of the time waited so far ...
POLL_PAUSE_MIN = 0.001  # ... but at least 1 ms ...
POLL_PAUSE_MAX = 1.0  # ... and at most 1 s
# With "inline_result" a submit may wait this long for its result (instant jobs: NullEngine, a sample batch
# window): one request instead of submit + retrieve_future. Longer jobs are long-polled as before.
INLINE_WAIT = {_wire.INLINE_WAIT_HEADER: str(_wire.INLINE_WAIT_SUBMIT)}
BATCH_INLINE_WAIT = {_wire.INLINE_WAIT_HEADER: str(_wire.INLINE_WAIT_BATCH)}  # all the results of a batch
# With "batch", requests made while others are on their way go out together in one POST batch (see _Batcher).
BATCH_SLOTS = 2  # requests or batches on the wire at once; what comes meanwhile waits for a free slot ...
BATCH_MAX_ITEMS = 256  # ... and goes with up to this many others ...
BATCH_MAX_BYTES = 1 << 20  # ... in a batch of up to 1 MiB; a bigger body is sent on its own, never queued
POLL_SLOTS = 4  # polls have slots of their own, so polls held by the server never hold up submissions


@cache
def aiohttp_module() -> Any:
    """aiohttp, imported on first use: it is half of the package's import time (its SSL set-up)."""
    import aiohttp

    return aiohttp


@cache
def connection_errors() -> tuple[type[BaseException], ...]:
    aio = aiohttp_module()
    return (aio.ClientConnectionError, aio.ClientPayloadError, TimeoutError)


class _Probe(msgspec.Struct):
    """The fields that tell a retrieve_future answer apart: try_again, an error, or the result."""

    type: Any = None
    error: Any = None
    message: Any = None
    queue_state: Any = None


def decode(payload: bytes, content_type: str, tp: type[T]) -> T:
    """Decode a response body (JSON or MessagePack, by its content type) into ``tp``."""
    try:
        result: T = _wire.decoder(tp, _wire.is_msgpack(content_type)).decode(payload)
    except msgspec.DecodeError as exc:
        raise APIError(f"unexpected response from the server for {tp.__name__}: {exc}") from None
    return result


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter: ``min(base * 2**attempt, cap)`` times a factor in [0.75, 1]."""
    return min(BACKOFF_BASE * 2.0**attempt, BACKOFF_CAP) * random.uniform(0.75, 1.0)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), if within (0, 60] s."""
    value: float | None = None
    if (ms := headers.get(_wire.RETRY_AFTER_MS)) is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = None
    if value is None and (raw := headers.get(_wire.RETRY_AFTER)) is not None:
        try:
            value = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            value = when.timestamp() - time.time()
    if value is None or not 0.0 < value <= RETRY_AFTER_MAX:
        return None
    return value


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@cache
def _raw_body_class() -> Any:
    aio = aiohttp_module()

    class RawBody(aio.BytesPayload):  # type: ignore[misc,name-defined]
        """An encoded body, sent as it is.

        aiohttp warns about ``bytes`` bodies over 1 MiB (as if writing them could block the loop); writing to
        a socket transport only buffers them, and a batch of tensors is often larger than that.
        """

        def __init__(self, value: bytes, content_type: str) -> None:
            aio.payload.Payload.__init__(self, value, content_type=content_type)
            self._size = len(value)

    return RawBody


class CallOptions(TypedDict, total=False):
    """The keyword arguments of ``Transport.call``, which ``Transport.request`` passes on."""

    body: Any
    params: Mapping[str, str | int] | None
    key: str | None
    headers: Mapping[str, str] | None
    backpressure: bool
    batch: bool


class Answer(NamedTuple):
    """An HTTP answer: of a request of its own, or of one request in a batch."""

    status: int
    payload: bytes
    content_type: str
    headers: Mapping[str, str]


class _Batcher:
    """Coalesces requests into ``POST batch`` requests, for a server with the "batch" extension.

    A request goes out at once, on its own, while fewer than ``slots`` requests or batches are on the
    wire. Otherwise it waits, and when a slot frees, everything that waited goes together (up to 256
    requests and 1 MiB). A lone call pays nothing; a burst (a pipelined training loop, thousands of
    concurrent samples) costs a few HTTP round trips instead of one per request. Each request keeps its own
    idempotency key, answer and retries: a failed batch fails each of its requests, and each retries as usual.
    """

    def __init__(self, transport: Transport, slots: int, inline: bool) -> None:
        self.transport = transport
        self.slots = slots
        self.inline = inline  # ask the server to wait for the results of the batch's submits
        self.busy = 0  # slots in use
        self.waiting: list[tuple[BatchItem, int, asyncio.Future[Answer]]] = []  # (request, size, answer)

    async def send(self, path: str, data: bytes, headers: dict[str, str]) -> Answer:
        if self.busy < self.slots and not self.waiting:
            self.busy += 1
            try:
                return await self.transport.send("POST", path, data, headers)
            finally:
                self._release()
        item = BatchItem(path=path, body=msgspec.Raw(data), idempotency_key=headers[_wire.IDEMPOTENCY_KEY])
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.waiting.append((item, len(data), answer))
        return await answer

    def _release(self) -> None:
        self.busy -= 1
        if not self.waiting or self.busy >= self.slots or self.transport.closed:
            return
        count, size = 0, 0
        for _, n, _ in self.waiting:
            if count == BATCH_MAX_ITEMS or (count and size + n > BATCH_MAX_BYTES):
                break
            count, size = count + 1, size + n
        batch, self.waiting = self.waiting[:count], self.waiting[count:]
        self.busy += 1
        self.transport.spawn(self._post(batch))

    async def _post(self, batch: list[tuple[BatchItem, int, asyncio.Future[Answer]]]) -> None:
        try:
            answers = await self.transport.send_batch([item for item, _, _ in batch], self.inline)
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

    def close(self) -> None:
        """The client is closing: fail what still waits (what is on the wire is cancelled with its task)."""
        waiting, self.waiting = self.waiting, []
        _fail(waiting, APIConnectionError("this ServiceClient is closed"))


def _fail(batch: list[tuple[BatchItem, int, asyncio.Future[Answer]]], exc: Exception) -> None:
    for _, _, answer in batch:
        if not answer.done():
            answer.set_exception(exc)


class _Retryable(Exception):
    def __init__(self, failure: str, hint: float | None, status: int | None) -> None:
        super().__init__(failure)
        self.failure = failure
        self.hint = hint
        self.status = status


class Transport:
    """One keep-alive session to one service, shared by a ServiceClient and all the clients it creates."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connection_limit: int = 100,
        retry_timeout: float = 300.0,
        request_timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.api_url = self.base_url + "api/v1/"
        self.connection_limit = connection_limit
        self.retry_timeout = retry_timeout
        self.request_timeout = request_timeout
        self.session_id = str(uuid.uuid4())
        self.binding = LoopBinding(on_bind=self._bound, on_rebind=self._forget_loop)
        self.closed = False
        self._headers = {_wire.API_KEY: api_key, "User-Agent": USER_AGENT, "Accept": JSON}
        for env, header in (
            ("CLOUDFLARE_ACCESS_CLIENT_ID", "CF-Access-Client-Id"),
            ("CLOUDFLARE_ACCESS_CLIENT_SECRET", "CF-Access-Client-Secret"),
        ):
            if value := os.environ.get(env):
                self._headers[header] = value
        self._headers.update(headers or {})
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._unordered = itertools.count(1)
        self._training_clients = itertools.count(0)
        self._sample_backoff_until = 0.0
        self._rtt = math.inf  # shortest recent retrieve_future round trip (to tell long-polls apart)
        self._caps: GetServerCapabilitiesResponse | None = None
        self._features: frozenset[str] | None = None
        self._caps_task: asyncio.Task[GetServerCapabilitiesResponse] | None = None
        self._shutdown_hook: tuple[AsyncIterator[None], asyncio.Future[None]] | None = None
        self._new_batchers()

    # ----------------------------------------------------------------------------------------- lifecycle

    def _forget_loop(self) -> None:
        # the old loop is closed: its session and tasks died with it
        self._session = None
        self._tasks = set()
        self._caps_task = None
        self._new_batchers()

    def _new_batchers(self) -> None:
        self._batcher = _Batcher(self, BATCH_SLOTS, inline=True)
        self._poll_batcher = _Batcher(self, POLL_SLOTS, inline=False)

    def _bound(self, loop: asyncio.AbstractEventLoop, private: bool) -> None:
        if private:
            close_at_exit(self)
            return

        # A loop of the caller's: close the session when that loop shuts down (asyncio.run and asyncio.Runner
        # finalize async generators before closing the loop), so a client used without ``async with`` leaves
        # no open connection behind and can bind to the next loop.
        async def on_loop_shutdown() -> AsyncIterator[None]:
            try:
                yield
            finally:
                session, self._session = self._session, None
                if session is not None:
                    await session.close()

        hook = on_loop_shutdown()
        self._shutdown_hook = (hook, asyncio.ensure_future(hook.__anext__(), loop=loop))

    def session(self) -> aiohttp.ClientSession:
        if self.closed:
            raise APIConnectionError("this ServiceClient is closed")
        session = self._session
        if session is None:
            aio = aiohttp_module()
            session = aio.ClientSession(
                connector=aio.TCPConnector(limit=self.connection_limit),
                headers=self._headers,
                timeout=aio.ClientTimeout(
                    total=None, sock_connect=CONNECT_TIMEOUT, sock_read=self.request_timeout
                ),
            )
            self._session = session
        return session

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Start a background task that ``aclose`` cancels."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        self.closed = True
        self._batcher.close()
        self._poll_batcher.close()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._caps_task is not None and not self._caps_task.done():
            self._caps_task.cancel()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ----------------------------------------------------------------------------------------- keys, features

    def training_client_index(self) -> int:
        return next(self._training_clients)

    def unordered_key(self) -> str:
        """``{session}:unordered:{n}``, n from 1 per ServiceClient: the key of a sampling request (§4.1)."""
        return f"{self.session_id}:unordered:{next(self._unordered)}"

    @staticmethod
    def auto_key() -> str:
        """A fresh key for any other non-GET request (the official client's form)."""
        # a random version-4 UUID without a system call per key (uuid4 reads os.urandom)
        return f"stainless-python-retry-{uuid.UUID(int=random.getrandbits(128), version=4)}"

    async def capabilities(self) -> GetServerCapabilitiesResponse:
        """``GET get_server_capabilities``, fetched once per ServiceClient and cached."""
        if self.closed:
            raise APIConnectionError("this ServiceClient is closed")
        if self._caps is not None:
            return self._caps
        task = self._caps_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._caps_task = asyncio.get_running_loop().create_task(
                self.request("GET", "get_server_capabilities", GetServerCapabilitiesResponse)
            )
        caps = await asyncio.shield(task)
        self._caps = caps
        self._features = frozenset(caps.features)
        return caps

    @property
    def submit_headers(self) -> Mapping[str, str]:
        """Headers for a request that creates a future: ask for the result inline where the server can."""
        return INLINE_WAIT if self._features is not None and "inline_result" in self._features else {}

    @property
    def msgpack(self) -> bool:
        """Whether bodies go as MessagePack (the server lists "msgpack"; known after the first request)."""
        return self._features is not None and "msgpack" in self._features

    @property
    def seq_mode(self) -> bool:
        """Whether the server orders training requests by their ``seq_id`` (known after the first request)."""
        return self._features is not None and "seq_id" in self._features

    async def features(self) -> frozenset[str]:
        """The protocol extensions the server advertises (none for the hosted service)."""
        if self._features is not None:
            return self._features
        try:
            await self.capabilities()
        except NotFoundError:
            self._features = frozenset()  # a server without the endpoint speaks the plain protocol
        assert self._features is not None
        return self._features

    # ----------------------------------------------------------------------------------------- requests

    def url(self, path: str) -> str:
        return self.api_url + path

    def encode(self, body: Any, msgpack: bool) -> tuple[bytes, str]:
        return _wire.encode(body, msgpack)

    async def request(self, method: str, path: str, result: type[T], **options: Unpack[CallOptions]) -> T:
        """``call`` (with retries), its answer decoded into ``result``."""
        payload, content_type = await self.call(method, path, **options)
        return decode(payload, content_type, result)

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str | int] | None = None,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        backpressure: bool = False,
        batch: bool = False,
    ) -> tuple[bytes, str]:
        """Send a request with retries; return the body and content type of the successful answer.

        ``body`` is encoded as MessagePack when the server advertised it, else as JSON. ``key`` is the
        idempotency key (a fresh one is made for non-GET requests without one). ``batch``: the request may
        share a ``POST batch`` with others (where the server has the extension; see ``_Batcher``).
        """
        msgpack = self.msgpack
        all_headers: dict[str, str] = dict(headers or {})
        data: bytes | None = None
        if body is not None:
            data, all_headers["Content-Type"] = self.encode(body, msgpack)
        if msgpack:
            all_headers["Accept"] = ACCEPT_MSGPACK
        if method != "GET":
            all_headers[_wire.IDEMPOTENCY_KEY] = key or self.auto_key()
        features = self._features or frozenset()
        batched = batch and "batch" in features and data is not None and len(data) <= BATCH_MAX_BYTES

        async def attempt() -> tuple[bytes, str]:
            if batched:
                assert data is not None
                answer = await self._batcher.send(path, data, all_headers)
            else:
                answer = await self.send(method, path, data, all_headers, params)
            if answer.status < 300:
                return answer.payload, answer.content_type
            raise self.failure(method, path, answer)

        return await self.retrying(attempt, f"{method} {path}", backpressure=backpressure)

    async def send(
        self,
        method: str,
        path: str,
        data: bytes | None,
        headers: Mapping[str, str],
        params: Mapping[str, str | int] | None = None,
    ) -> Answer:
        """One HTTP request, no retries."""
        body = None if data is None else _raw_body_class()(data, headers["Content-Type"])
        async with self.session().request(
            method, self.url(path), data=body, params=params, headers=headers
        ) as resp:
            return Answer(resp.status, await resp.read(), resp.content_type, resp.headers)

    async def send_batch(self, items: list[BatchItem], inline: bool) -> list[Answer]:
        """``POST batch`` (no retries): the answer of each request, or the batch's own failure for each."""
        msgpack = self.msgpack
        data, content_type = self.encode(BatchRequest(requests=items), msgpack)
        headers = {"Content-Type": content_type, _wire.IDEMPOTENCY_KEY: self.auto_key()}
        if inline and self.submit_headers:
            headers.update(BATCH_INLINE_WAIT)
        if msgpack:
            headers["Accept"] = ACCEPT_MSGPACK
        answer = await self.send("POST", "batch", data, headers)
        if answer.status >= 300:
            return [answer] * len(items)
        responses = decode(answer.payload, answer.content_type, BatchResponse).responses
        if len(responses) != len(items):
            raise APIError(f"the server answered {len(responses)} requests of a batch of {len(items)}")
        return [Answer(r.status, bytes(r.body), answer.content_type, {}) for r in responses]

    def failure(self, method: str, path: str, answer: Answer) -> Exception:
        """The exception for an error answer: ``_Retryable`` or the final ``APIStatusError``."""
        status = answer.status
        should = answer.headers.get(_wire.SHOULD_RETRY, "").lower()
        retryable = should == "true" or (should != "false" and (status in RETRY_STATUSES or status >= 500))
        message, code = _wire.parse_error_body(answer.payload, answer.content_type)
        if retryable:
            return _Retryable(f"HTTP {status} ({message})", retry_after(answer.headers), status)
        return error_for_status(status)(
            f"{method} {path}: HTTP {status}: {message}", status=status, code=code
        )

    async def retrying(
        self, attempt: Callable[[], Awaitable[T]], what: str, *, backpressure: bool = False
    ) -> T:
        """Run ``attempt`` until it succeeds, fails for good, or the retry budget is spent."""
        start = time.monotonic()
        tries = 0
        while True:
            if backpressure:
                await self.sampling_window()
            tries += 1
            try:
                return await attempt()
            except _Retryable as exc:
                failure, hint, status = exc.failure, exc.hint, exc.status
            except connection_errors() as exc:
                failure, hint, status = _describe(exc), None, None
            if backpressure and status == 429:
                # sampling backpressure: everyone waits out the window, then this request goes again
                self.open_sampling_window(hint)
                start = time.monotonic()
                continue
            elapsed = time.monotonic() - start
            if elapsed >= self.retry_timeout:
                raise RetryBudgetExceededError(
                    f"{what}: gave up after {tries} attempts in {elapsed:.1f} s "
                    f"(retry budget {self.retry_timeout:g} s); last failure: {failure}",
                    status=status,
                )
            delay = hint if hint is not None else backoff_delay(tries - 1)
            await asyncio.sleep(min(delay, self.retry_timeout - elapsed))

    # ----------------------------------------------------------------------------------------- backpressure

    def open_sampling_window(self, hint: float | None) -> None:
        until = time.monotonic() + (hint if hint is not None else SAMPLE_BACKOFF)
        self._sample_backoff_until = max(self._sample_backoff_until, until)

    async def sampling_window(self) -> None:
        # a loop, not an Event: the window may be pushed further out while we wait
        while (wait := self._sample_backoff_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)

    # ----------------------------------------------------------------------------------------- futures

    async def poll(
        self,
        request_id: str,
        result: type[T],
        *,
        request_type: str,
        model_id: str | None = None,
        roundtrip: float | None = None,
        inline: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET,
    ) -> T:
        """Long-poll ``retrieve_future`` until the result is there (PROTOCOL.md §3.2-3.3).

        A failed job raises ``RequestFailedError``; an expired future ``GoneError``; a run of failures
        (connection errors, 429, 5xx) longer than the retry budget ``RetryBudgetExceededError``.
        """
        session = self.session()
        msgpack = self.msgpack
        data, content_type = self.encode(
            FutureRetrieveRequest(request_id=request_id, model_id=model_id or msgspec.UNSET), msgpack
        )
        headers = {
            "Content-Type": content_type,
            _wire.IDEMPOTENCY_KEY: self.auto_key(),
            _wire.REQUEST_TYPE: request_type,
        }
        if msgpack:
            headers["Accept"] = ACCEPT_MSGPACK
        timeout = aiohttp_module().ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=POLL_READ_TIMEOUT
        )
        url = self.url("retrieve_future")
        batched = "batch" in (self._features or ())
        start = time.monotonic()
        failing_since: float | None = None
        failures = 0
        iteration = 0
        while True:
            headers[_wire.REQUEST_ITERATION] = str(iteration)
            if iteration == 0 and roundtrip is not None:
                headers[_wire.ROUNDTRIP] = f"{roundtrip:.6f}"
            elif iteration == 1:
                headers.pop(_wire.ROUNDTRIP, None)
            iteration += 1
            sent = time.monotonic()
            hint: float | None = None
            try:
                if inline is not msgspec.UNSET:  # the submit's answer carried the result ("inline_result")
                    answer = Answer(200, bytes(inline), MSGPACK if msgpack else JSON, {})
                    inline = msgspec.UNSET
                elif batched:  # with other polls in one batch while POLL_SLOTS polls are out
                    answer = await self._poll_batcher.send("retrieve_future", data, headers)
                else:
                    async with session.post(url, data=data, headers=headers, timeout=timeout) as resp:
                        answer = Answer(resp.status, await resp.read(), resp.content_type, resp.headers)
            except connection_errors() as exc:
                failure = _describe(exc)
            else:
                status, payload, content_type = answer.status, answer.payload, answer.content_type
                if status == 200:
                    probe = decode(payload, content_type, _Probe)
                    if probe.type == "try_again":
                        failing_since, failures = None, 0
                        if probe.queue_state != "batch":  # "batch": another poll of its batch was answered
                            await self._pause_after_try_again(start, sent)
                        continue
                    if probe.error is not None:
                        message = probe.message if isinstance(probe.message, str) else str(probe.error)
                        raise RequestFailedError(message, code=str(probe.error), request_id=request_id)
                    return decode(payload, content_type, result)
                if status == 408:
                    # "still queued" (the official server's long-poll timeout): not a failure, poll again
                    failing_since, failures = None, 0
                    await self._pause_after_try_again(start, sent)
                    continue
                if status != 429 and status < 500:
                    message, code = _wire.parse_error_body(payload, content_type)
                    cls: type[APIStatusError] = error_for_status(status)
                    raise cls(
                        f"retrieve_future: HTTP {status}: {message}",
                        status=status,
                        code=code,
                        request_id=request_id,
                    )
                failure = f"HTTP {status} ({_wire.parse_error_body(payload, content_type)[0]})"
                hint = retry_after(answer.headers)
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
            elif now - failing_since >= self.retry_timeout:
                raise RetryBudgetExceededError(
                    f"retrieve_future: {failures + 1} failed polls in {now - failing_since:.1f} s "
                    f"(retry budget {self.retry_timeout:g} s); last failure: {failure}",
                    request_id=request_id,
                )
            await asyncio.sleep(hint if hint is not None else backoff_delay(failures))
            failures += 1

    async def _pause_after_try_again(self, start: float, sent: float) -> None:
        """Re-poll at once after a long-poll; after a quick answer wait ~20 % of the time waited so far.

        A poll the server held (a long-poll) took clearly longer than the round trip, which is estimated as
        the shortest poll seen lately; a quick ``try_again`` from a server that does not hold polls is
        followed by a pause, so such a server sees a few polls per future, not one per round trip.
        """
        now = time.monotonic()
        took = now - sent
        self._rtt = min(took, self._rtt * 1.05 + 1e-4)  # lets the estimate rise again if the path slows
        pause = min(max(POLL_PAUSE_FRACTION * (now - start), POLL_PAUSE_MIN), POLL_PAUSE_MAX)
        pause *= random.uniform(0.8, 1.2)
        if took - self._rtt < pause:  # the server did not hold the request
            await asyncio.sleep(pause)
