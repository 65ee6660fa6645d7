"""The session: one aiohttp session per ServiceClient, and the one seam, ``send(request) -> answer``.

Submits, polls, batches and the REST download all go through ``Transport.send``: one HTTP exchange, no
retries. Above it ``call`` adds the client's policy (PROTOCOL.md §1, §3, §4):

* every request carries ``X-API-Key``, ``Accept`` and ``User-Agent: hpcai_async/<version>``; a non-GET request
  carries an ``X-Idempotency-Key`` that stays the same across its retries;
* retries follow ``_retry`` (which failures, how long to wait, one budget per operation);
* a 429 on a sampling request is backpressure: it opens a short window, shared by every sampler of the
  ServiceClient, in which no sampling request is sent (the wait is spent from the request's budget);
* bodies are JSON, or MessagePack with raw tensor bytes when the server lists ``"msgpack"`` (``_wire``);
* with ``"batch"`` requests made while others are on the wire go together (``_batch``); with
  ``"inline_result"`` a submit's answer may carry its result; futures are long-polled (``_poll``).

The HTTP exchange itself (aiohttp, same-origin redirects, streamed downloads) is ``_exchange``; the decisions
live in ``_retry``, ``_wire``, ``_batch`` and ``_poll``. Here: the session's life on whichever loop uses it,
the server's capabilities, and the policy just above the seam.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack

import msgspec

from . import _retry, _wire
from ._batch import BATCH_MAX_BYTES, BATCH_SLOTS, POLL_SLOTS, Batcher
from ._errors import (
    APIConnectionError,
    ConfigurationError,
    NotFoundError,
    UnsupportedFeatureError,
)
from ._exchange import connection_errors, describe, exchange, new_session
from ._loop import LoopBinding, close_at_exit
from ._poll import POLL_READ_TIMEOUT, Poller, poll_request
from ._retry import RetryBudget, RetryPolicy
from ._version import __version__
from ._wire import Answer, Request
from .types import GetServerCapabilitiesResponse

if TYPE_CHECKING:
    import aiohttp

__all__ = ("DEFAULT_BASE_URL", "Answer", "Request", "Transport")

T = TypeVar("T")

DEFAULT_BASE_URL = "https://www.hpc-ai.com/finetunesdk"  # the HPC-AI README's value (PROTOCOL.md §1.1)
USER_AGENT = f"hpcai_async/{__version__}"
REQUEST_READ_TIMEOUT = 60.0  # s, the official client's request timeout
SAMPLE_BACKOFF = 1.0  # s: the sampling backpressure window after a 429 without Retry-After (§6.6)
INLINE_WAIT = {_wire.INLINE_WAIT_HEADER: str(_wire.INLINE_WAIT_SUBMIT)}
BATCH_INLINE_WAIT = {_wire.INLINE_WAIT_HEADER: str(_wire.INLINE_WAIT_BATCH)}  # all the results of a batch


class CallOptions(TypedDict, total=False):
    """The keyword arguments of ``Transport.call``, which ``Transport.request`` passes on."""

    body: Any
    params: Mapping[str, str | int] | None
    key: str | None
    headers: Mapping[str, str] | None
    backpressure: bool
    batch: bool
    budget: RetryBudget | None
    on_queue_state: Callable[[str], None] | None


class Transport:
    """One keep-alive session to one service, shared by a ServiceClient and all the clients it creates."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connection_limit: int = 100,
        retry: RetryPolicy | None = None,
        request_timeout: float = REQUEST_READ_TIMEOUT,
        poll_timeout: float = POLL_READ_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> None:
        self._settings: dict[str, Any] = dict(
            base_url=base_url,
            api_key=api_key,
            connection_limit=connection_limit,
            retry=retry,
            request_timeout=request_timeout,
            poll_timeout=poll_timeout,
            headers=headers,
            params=params,
        )
        self.base_url = base_url.rstrip("/") + "/"
        self.api_url = self.base_url + "api/v1/"
        self.connection_limit = connection_limit
        self.retry = retry or RetryPolicy()
        self.request_timeout = request_timeout
        self.params = dict(params or {})
        self.session_id = str(uuid.uuid4())
        self.binding = LoopBinding(on_bind=self._bound, on_rebind=self._forget_loop)
        self.closed = False
        self._headers = {_wire.API_KEY: api_key, "User-Agent": USER_AGENT, "Accept": _wire.JSON}
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
        self._poller = Poller(connection_errors(), poll_timeout)
        self._caps: GetServerCapabilitiesResponse | None = None
        self._features: frozenset[str] | None = None
        self._caps_task: asyncio.Task[GetServerCapabilitiesResponse] | None = None
        self._shutdown_hook: tuple[AsyncIterator[None], asyncio.Future[None]] | None = None
        self._new_batchers()

    def detached(self) -> Transport:
        """A new transport to the same service with the same settings: its own session, not yet bound."""
        return Transport(**self._settings)

    def settings(self) -> dict[str, Any]:
        """The constructor arguments (URL, API key, timeouts, retry policy, headers): what rebuilds it
        elsewhere, e.g. in another process (they hold the API key)."""
        return dict(self._settings)

    @property
    def retry_timeout(self) -> float:
        return self.retry.timeout

    # ----------------------------------------------------------------------------------------- lifecycle

    def _forget_loop(self) -> None:
        # the old loop is closed: its session and tasks died with it
        self._session = None
        self._tasks = set()
        self._caps_task = None
        self._new_batchers()

    def _new_batchers(self) -> None:
        msgpack = lambda: self.msgpack  # noqa: E731
        self._batcher = Batcher(
            self.send, self.spawn, slots=BATCH_SLOTS, batch_headers=self._batch_headers, msgpack=msgpack
        )
        self._poll_batcher = Batcher(
            self.send, self.spawn, slots=POLL_SLOTS, batch_headers=self._poll_batch_headers, msgpack=msgpack
        )

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
            session = new_session(self.connection_limit, self._headers, self.request_timeout)
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

    async def require(self, feature: str, what: str) -> None:
        """Raise ``UnsupportedFeatureError`` unless the server advertises ``feature`` (``what`` needs it)."""
        if feature not in await self.features():
            raise UnsupportedFeatureError(
                feature,
                f"{what} needs the server feature {feature!r}, which {self.base_url} does not advertise "
                "(the hosted HPC-AI service has none of the local server's extensions; run it against "
                "hpcai_async.server, or do without it)",
            )

    # ----------------------------------------------------------------------------------------- the seam

    def url(self, path: str) -> str:
        return self.api_url + path

    async def send(self, request: Request) -> Answer:
        """One HTTP exchange, no retries: ``_exchange.exchange``."""
        return await exchange(self.session(), self.url(request.path), self.base_url, self.params, request)

    # ----------------------------------------------------------------------------------------- policy

    def encode(self, body: Any, msgpack: bool, what: str) -> tuple[bytes, str]:
        try:
            return _wire.encode(body, msgpack)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as exc:
            raise ConfigurationError(
                f"{what}: the request body cannot be encoded ({describe(exc)}); integers (token ids) must "
                "fit in 64 bits and values must be numbers, strings, lists or the package's types"
            ) from None

    async def request(self, method: str, path: str, result: type[T], **options: Unpack[CallOptions]) -> T:
        """``call`` (with retries), its answer decoded into ``result``."""
        answer = await self.call(method, path, **options)
        return _wire.decode(answer.payload, answer.content_type, result)

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
        budget: RetryBudget | None = None,
        on_queue_state: Callable[[str], None] | None = None,
    ) -> Answer:
        """Send a request with retries (from ``budget``, else a fresh one); return the successful answer.

        ``body`` is encoded as MessagePack when the server advertised it, else as JSON (a body that cannot
        be encoded raises ``ConfigurationError`` before anything is sent). ``key`` is the idempotency key (a
        fresh one is made for non-GET requests without one). ``batch``: the request may share a ``POST
        batch`` with others (where the server has the extension).
        """
        msgpack = self.msgpack
        all_headers: dict[str, str] = dict(headers or {})
        data: bytes | None = None
        if body is not None:
            data, all_headers["Content-Type"] = self.encode(body, msgpack, f"{method} {path}")
        if msgpack:
            all_headers["Accept"] = _wire.ACCEPT_MSGPACK
        if method != "GET":
            all_headers[_wire.IDEMPOTENCY_KEY] = key or _wire.auto_key()
        features = self._features or frozenset()
        batched = batch and "batch" in features and data is not None and len(data) <= BATCH_MAX_BYTES
        request = Request(method, path, data, all_headers, params)
        return await self.retrying(
            request,
            budget or self.retry.budget(f"{method} {path}"),
            backpressure=backpressure,
            batched=batched,
            on_queue_state=on_queue_state,
        )

    async def retrying(
        self,
        request: Request,
        budget: RetryBudget,
        *,
        backpressure: bool = False,
        batched: bool = False,
        on_queue_state: Callable[[str], None] | None = None,
    ) -> Answer:
        """Send ``request`` until it succeeds, fails for good, or ``budget`` is spent."""
        while True:
            if backpressure:
                await self.sampling_window()
            try:
                answer = await (self._batcher.send(request) if batched else self.send(request))
                if answer.status < 300:
                    budget.progress()
                    if on_queue_state is not None:
                        on_queue_state("active")
                    return answer
                raise _retry.failure(request, answer)
            except _retry.Retryable as exc:
                failure, hint, status = exc.failure, exc.hint, exc.status
            except connection_errors() as exc:
                failure, hint, status = describe(exc), None, None
            if backpressure and status == 429:
                # sampling backpressure: everyone waits out the window (spent from this request's budget)
                self.open_sampling_window(hint)
                if on_queue_state is not None:
                    on_queue_state("paused_rate_limit")
                budget.throttled(failure, status)  # spent from the budget; the window is the wait
                continue
            await asyncio.sleep(budget.failed(failure, status, hint))

    # ----------------------------------------------------------------------------------------- backpressure

    def open_sampling_window(self, hint: float | None) -> None:
        until = time.monotonic() + (hint if hint is not None else SAMPLE_BACKOFF)
        self._sample_backoff_until = max(self._sample_backoff_until, until)

    async def sampling_window(self) -> None:
        # a loop, not an Event: the window may be pushed further out while we wait
        while (wait := self._sample_backoff_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)

    # ----------------------------------------------------------------------------------------- futures

    def _poll_batch_headers(self) -> dict[str, str]:
        headers = {_wire.IDEMPOTENCY_KEY: _wire.auto_key()}
        if self.msgpack:
            headers["Accept"] = _wire.ACCEPT_MSGPACK
        return headers

    def _batch_headers(self) -> dict[str, str]:
        """A batch of submits: as a batch of polls, and asking for all their results inline where it can."""
        headers = self._poll_batch_headers()
        if self.submit_headers:
            headers.update(BATCH_INLINE_WAIT)
        return headers

    async def poll(
        self,
        request_id: str,
        result: type[T],
        *,
        request_type: str,
        model_id: str | None = None,
        roundtrip: float | None = None,
        inline: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET,
        inline_headers: Mapping[str, str] | None = None,
        budget: RetryBudget | None = None,
        on_queue_state: Callable[[str], None] | None = None,
        on_headers: Callable[[Mapping[str, str]], None] | None = None,
    ) -> T:
        """Long-poll ``retrieve_future`` until the result is there (``_poll``).

        ``inline`` is a result the submit's answer carried (its headers: ``inline_headers``);
        ``on_headers`` is given the headers of the answer that carries the result. A failed job raises
        ``RequestFailedError``; an expired future ``GoneError``; failures (connection errors, 429, 5xx) for
        longer than the retry budget without progress ``RetryBudgetExceededError``.
        """
        msgpack = self.msgpack
        request = poll_request(
            request_id,
            model_id,
            msgpack=msgpack,
            request_type=request_type,
            key=_wire.auto_key(),
            roundtrip=roundtrip,
            read_timeout=self._poller.read_timeout,
        )
        batched = "batch" in (self._features or ())
        answer = None
        if inline is not msgspec.UNSET:  # the submit's answer carried the result ("inline_result")
            answer = Answer(
                200, bytes(inline), _wire.MSGPACK if msgpack else _wire.JSON, inline_headers or {}
            )
        return await self._poller.poll(
            self._poll_batcher.send if batched else self.send,
            request,
            result,
            budget or self.retry.budget(f"retrieve_future ({request_type})"),
            request_id=request_id,
            inline=answer,
            on_queue_state=on_queue_state,
            on_headers=on_headers,
        )
