"""One HTTP exchange on the client's aiohttp session, no retries: ``exchange(session, url, ...) -> Answer``.

What it does: sends the encoded body as it is; follows redirects only within the base URL's origin (scheme,
host, port), so the API key never goes to another server, and a redirect elsewhere is an error that names
where it pointed; hands a 2xx body to ``request.sink`` block by block when there is one (a download), and
checks it arrived whole. aiohttp is imported here, on first use: it is half of the package's import time.
The policy around an exchange (headers, retries, backpressure, batching) is ``_http.Transport``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from . import _wire
from ._errors import APIConnectionError, PermissionDeniedError
from ._wire import Answer, Request

if TYPE_CHECKING:
    import aiohttp

__all__ = ("CONNECT_TIMEOUT", "aiohttp_module", "connection_errors", "describe", "exchange", "new_session")

CONNECT_TIMEOUT = 5.0  # s, as the official client (PROTOCOL.md §1.4)
MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@cache
def aiohttp_module() -> Any:
    """aiohttp, imported on first use."""
    import aiohttp

    return aiohttp


@cache
def connection_errors() -> tuple[type[BaseException], ...]:
    """What a broken connection raises (retried): aiohttp's connection and payload errors, and timeouts."""
    aio = aiohttp_module()
    return (aio.ClientConnectionError, aio.ClientPayloadError, TimeoutError)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception (the type alone when it has no message), for error texts."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def new_session(limit: int, headers: Mapping[str, str], read_timeout: float) -> aiohttp.ClientSession:
    """A keep-alive session: ``limit`` connections, ``headers`` on every request, the default timeouts."""
    aio = aiohttp_module()
    session: aiohttp.ClientSession = aio.ClientSession(
        connector=aio.TCPConnector(limit=limit),
        headers=headers,
        timeout=aio.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=read_timeout),
    )
    return session


async def exchange(
    session: aiohttp.ClientSession,
    url: str,
    base_url: str,
    params: Mapping[str, str | int],
    request: Request,
) -> Answer:
    """Send ``request`` to ``url`` (``params``: the client's query parameters, under the request's own).

    With ``request.sink`` a 2xx body is handed to it block by block (and ``payload`` is empty); a body
    shorter than its ``Content-Length`` raises ``ClientPayloadError`` (a broken connection).
    """
    method, data = request.method, request.data
    body = None if data is None else _raw_body_class()(data, request.headers["Content-Type"])
    options: dict[str, Any] = {"allow_redirects": False, "headers": request.headers}
    if request.read_timeout is not None:
        options["timeout"] = _read_timeout(request.read_timeout)
    target: Any = url
    query = {**params, **request.params} if request.params else (params or None)
    for _ in range(MAX_REDIRECTS + 1):
        async with session.request(method, target, data=body, params=query, **options) as resp:
            if resp.status in _REDIRECTS and "Location" in resp.headers:
                target = _redirect_target(request, base_url, resp.url, resp.headers["Location"])
                query = None  # the Location is the whole new URL
                if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                    method, body = "GET", None
                continue
            if request.sink is not None and resp.status < 300:
                await _stream(resp, request.sink)
                return Answer(resp.status, b"", resp.content_type, resp.headers)
            return Answer(resp.status, await resp.read(), resp.content_type, resp.headers)
    raise APIConnectionError(f"{request.method} {request.path}: more than {MAX_REDIRECTS} redirects")


def _redirect_target(request: Request, base_url: str, current: Any, location: str) -> Any:
    """Where a redirect leads, if it stays within the base URL's origin; else PermissionDeniedError."""
    from yarl import URL  # aiohttp's URL type

    target = current.join(URL(location))
    base = URL(base_url)
    if (target.scheme, target.host, target.port) != (base.scheme, base.host, base.port):
        raise PermissionDeniedError(
            f"{request.method} {request.path}: the server redirected to "
            f"{_wire.shorten(str(target.origin()))}, another origin than {base.origin()}; not followed, "
            "so the API key is not sent there (set base_url to the service's real address)",
            status=403,
            code="cross_origin_redirect",
        )
    return target


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


@cache
def _read_timeout(seconds: float) -> Any:
    """aiohttp's timeout for a request with its own read timeout (one object per value: they are frozen)."""
    return aiohttp_module().ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=seconds)


async def _stream(resp: Any, sink: Any) -> None:
    total = resp.content_length
    written = 0
    await sink(b"", total)  # a body starts (again, on a retry): the sink starts over
    async for block in resp.content.iter_chunked(1 << 20):
        written += len(block)
        await sink(block, total)
    if total is not None and written != total:
        raise aiohttp_module().ClientPayloadError(f"the body ended after {written} of {total} bytes")
