"""Test fixture: a loopback HTTP/1.1 proxy that records every request and injects faults.

It sits between a client and a real server on 127.0.0.1 and runs on its own thread and event loop, so sync and
async tests can use it alike::

    with FaultProxy(server.url) as proxy:
        proxy.inject("forward_backward", "status", status=503, after=True)   # the server runs it, the client
        ...                                                                  # sees a 503 and must retry
        assert [r.path for r in proxy.requests] == [...]

Faults (each matches a path substring and an optional method, and fires ``times`` times):

* ``status``   -- answer ``status`` with ``headers`` and ``body`` (``after=True``: forward, then answer so);
* ``reset``    -- drop the connection without an answer (``after=True``: after the server handled it);
* ``delay``    -- wait ``delay`` seconds, then forward;
* ``truncate`` -- forward, then send the answer's head and only half its body and drop the connection;
* ``stall``    -- forward, then send the answer's head and half its body and send nothing more (the client's
  read timeout must end it; the connection is dropped after ``delay`` seconds, 30 by default);
* ``cut``      -- forward only the first half of the request to the server, then drop both connections
  (a reset in the middle of the request: the server never sees a whole request).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

__all__ = ("Fault", "FaultProxy", "Recorded")

FaultKind = Literal["status", "reset", "delay", "truncate", "stall", "cut"]


@dataclass
class Recorded:
    """One request as the proxy saw it (header names in lower case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def endpoint(self) -> str:
        """The path after ``/api/v1/`` without the query, e.g. ``forward_backward``."""
        path = self.path.split("?", 1)[0]
        return path.split("/api/v1/", 1)[-1]


@dataclass
class Fault:
    path: str
    kind: FaultKind
    times: int = 1
    method: str | None = None
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"error": "injected", "message": "injected by the fault proxy"}'
    delay: float = 0.0
    after: bool = False
    fired: int = 0

    def matches(self, req: Recorded) -> bool:
        return (
            self.fired < self.times
            and self.path in req.path
            and (self.method is None or self.method == req.method)
        )


class FaultProxy:
    """A recording, fault-injecting HTTP proxy in front of ``upstream`` (``http://127.0.0.1:port[/prefix]``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname and parts.port, upstream
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self._prefix}"

    # ----------------------------------------------------------------------------------------- control

    def inject(self, path: str, kind: FaultKind, **options: object) -> Fault:
        fault = Fault(path, kind, **options)  # type: ignore[arg-type]
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def endpoints(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [r.endpoint for r in self.requests if method is None or r.method == method]

    def find(self, endpoint: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    def _take(self, req: Recorded) -> Fault | None:
        with self._lock:
            self.requests.append(req)
            for fault in self.faults:
                if fault.matches(req):
                    fault.fired += 1
                    return fault
        return None

    # ----------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shutdown() -> None:
            server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            handlers = list(self._handlers)  # some may still sleep in a "delay" fault
            for handler in handlers:
                handler.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(5)
        loop.close()
        self._loop = self._server = None

    # ----------------------------------------------------------------------------------------- proxying

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                raw, req = request
                fault = self._take(req)
                if fault is not None and fault.kind == "delay":
                    await asyncio.sleep(fault.delay)
                if fault is not None and not fault.after and fault.kind in ("status", "reset"):
                    if not await _answer_instead(writer, fault):
                        return
                    continue
                if upstream is None:
                    upstream = await asyncio.open_connection(self._host, self._port)
                if fault is not None and fault.kind == "cut":
                    upstream[1].write(raw[: len(raw) // 2])
                    await upstream[1].drain()
                    upstream[1].transport.abort()
                    upstream = None
                    writer.transport.abort()
                    return
                upstream[1].write(raw)
                await upstream[1].drain()
                head, body, keep_alive = await _read_response(upstream[0], req.method)
                if not keep_alive:
                    upstream[1].close()
                    upstream = None
                if fault is not None and fault.after and fault.kind in ("status", "reset"):
                    if not await _answer_instead(writer, fault):
                        return
                    continue
                if fault is not None and fault.kind in ("truncate", "stall"):
                    writer.write(head + body[: len(body) // 2])
                    await writer.drain()
                    if fault.kind == "stall":
                        await asyncio.sleep(fault.delay or 30.0)
                    writer.transport.abort()
                    return
                writer.write(head + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(handler)
            self._writers.discard(writer)
            writer.close()
            if upstream is not None:
                upstream[1].close()


async def _answer_instead(writer: asyncio.StreamWriter, fault: Fault) -> bool:
    """Answer a "status" fault's response, or drop the connection for "reset"; False if it was dropped."""
    if fault.kind == "reset":
        writer.transport.abort()
        return False
    writer.write(_response(fault.status, fault.headers, fault.body))
    await writer.drain()
    return True


def _headers(block: bytes) -> tuple[str, dict[str, str]]:
    lines = block.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, Recorded] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    start, headers = _headers(head)
    method, path, _version = start.split(" ", 2)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
        raw = head + body
        body = _dechunk(body)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        raw = head + body
    return raw, Recorded(method, path, headers, body)


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[bytes, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    start, headers = _headers(head)
    status = int(start.split(" ", 2)[1])
    keep_alive = headers.get("connection", "").lower() != "close"
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.read()
        keep_alive = False
    return head, body, keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        parts.append(size_line)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                line = await reader.readuntil(b"\r\n")
                parts.append(line)
                if line == b"\r\n":
                    return b"".join(parts)
        parts.append(await reader.readexactly(size + 2))


def _dechunk(raw: bytes) -> bytes:
    out, at = [], 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


_REASONS = {
    200: "OK",
    400: "Bad Request",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _response(status: int, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    all_headers = {"Content-Type": "application/json", **headers, "Content-Length": str(len(body))}
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
