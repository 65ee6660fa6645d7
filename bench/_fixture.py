"""A protocol fixture for the benches — NOT DOING ANY TRAINING.

A small aiohttp.web server that speaks just enough of the HPC-AI protocol (PROTOCOL.md §2-§3) for both SDKs:
create_model, get_info, forward, forward_backward, optim_step, asample and retrieve_future. Every job
"takes" exactly ``delay`` seconds (a timer, no computation) and returns a fixed, well-formed result. It
exists for the behaviour the benches need to control precisely:

- ``mode="long_poll"``: retrieve_future holds the request until the job is done (up to ``poll_timeout``);
- ``mode="try_again"``: retrieve_future answers ``{"type": "try_again"}`` at once while the job runs.

It counts accepted connections and requests. It runs on its own event loop in a daemon thread of the bench
process (the measured client always runs in another process), on 127.0.0.1 and port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from typing import Any

import msgspec
from aiohttp import web

_json = msgspec.json.Encoder()


class FixtureServer:
    def __init__(
        self,
        *,
        delay: float = 0.0,
        mode: str = "long_poll",
        poll_timeout: float = 30.0,
        api_key: str = "bench-fixture-key",
    ) -> None:
        assert mode in ("long_poll", "try_again")
        self.delay = delay
        self.mode = mode
        self.poll_timeout = poll_timeout
        self.api_key = api_key
        self.url = ""
        self.port = 0
        self.connections = 0
        self.requests = 0
        self._ids = itertools.count(1)
        self._peers: set[Any] = set()
        self._jobs: dict[str, asyncio.Future[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopped: asyncio.Event | None = None

    # ----------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> FixtureServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name="bench-fixture")
        self._thread.start()
        ready.wait(30)
        if not self.url:
            raise RuntimeError("fixture server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self, ready: threading.Event) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        finally:
            ready.set()  # also when start-up failed: __enter__ then raises instead of waiting
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=1 << 30, middlewares=[self._count])
        r = app.router
        r.add_get("/api/v1/healthz", self._healthz)
        r.add_get("/api/v1/get_server_capabilities", self._capabilities)
        r.add_post("/api/v1/create_model", self._create_model)
        r.add_post("/api/v1/get_info", self._get_info)
        r.add_post("/api/v1/forward", self._forward_backward)
        r.add_post("/api/v1/forward_backward", self._forward_backward)
        r.add_post("/api/v1/optim_step", self._optim_step)
        r.add_post("/api/v1/asample", self._asample)
        r.add_post("/api/v1/retrieve_future", self._retrieve)
        r.add_post("/api/v1/telemetry", self._telemetry)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        ready.set()
        await self._stopped.wait()
        await self._runner.cleanup()

    # ----------------------------------------------------------------------------------------- helpers

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer not in self._peers:
            self._peers.add(peer)
            self.connections += 1
        if request.headers.get("X-API-Key") != self.api_key:
            return self._ok({"error": "unauthorized", "message": "bad api key"}, status=401)
        resp: web.StreamResponse = await handler(request)
        return resp

    @staticmethod
    def _ok(obj: Any, status: int = 200) -> web.Response:
        return web.Response(body=_json.encode(obj), status=status, content_type="application/json")

    def _submit(self, result: dict[str, Any], model_id: str | None = None) -> web.Response:
        assert self._loop is not None
        rid = f"req-{next(self._ids)}"
        fut: asyncio.Future[bytes] = self._loop.create_future()
        body = _json.encode(result)
        if self.delay <= 0:
            fut.set_result(body)
        else:
            self._loop.call_later(self.delay, fut.set_result, body)
        self._jobs[rid] = fut
        return self._ok({"request_id": rid, "model_id": model_id})

    # ----------------------------------------------------------------------------------------- routes

    async def _healthz(self, _: web.Request) -> web.Response:
        return self._ok({"status": "ok"})

    async def _telemetry(self, _: web.Request) -> web.Response:
        return self._ok({"status": "accepted"})

    async def _capabilities(self, _: web.Request) -> web.Response:
        return self._ok({"supported_models": [{"model_name": "bench/null-model"}], "features": []})

    async def _create_model(self, request: web.Request) -> web.Response:
        await request.read()
        return self._submit({"model_id": "bench-model-1", "type": "create_model"})

    async def _get_info(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        return self._ok(
            {
                "type": "get_info",
                "model_id": body.get("model_id", "bench-model-1"),
                "model_data": {"arch": "null", "model_name": "bench/null-model"},
                "is_lora": True,
                "lora_rank": 8,
                "model_name": "bench/null-model",
            }
        )

    async def _forward_backward(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        fb = body.get("forward_backward_input") or body.get("forward_input") or {}
        outputs = []
        for datum in fb.get("data", []):
            n = sum(len(c.get("tokens", [])) for c in datum["model_input"]["chunks"])
            zeros = {"data": [0.0] * n, "dtype": "float32", "shape": [n]}
            outputs.append({"logprobs": zeros, "elementwise_loss": zeros})
        result = {
            "loss_fn_output_type": "cross_entropy",
            "loss_fn_outputs": outputs,
            "metrics": {"loss:mean": 0.0, "num_examples:sum": float(len(outputs)), "step:max": 0.0},
        }
        return self._submit(result, body.get("model_id"))

    async def _optim_step(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        return self._submit({"metrics": {"step:max": 1.0, "learning_rate:mean": 1e-4}}, body.get("model_id"))

    async def _asample(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        n = int(body.get("num_samples", 1))
        max_tokens = (body.get("sampling_params") or {}).get("max_tokens") or 4
        seq = {"tokens": list(range(max_tokens)), "logprobs": [-1.0] * max_tokens, "stop_reason": "length"}
        return self._submit({"type": "sample", "sequences": [seq] * n, "prompt_logprobs": None})

    async def _retrieve(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        rid = body["request_id"]
        fut = self._jobs.get(rid)
        if fut is None:
            return self._ok({"error": "not_found", "message": f"unknown request {rid}"}, status=404)
        if not fut.done() and self.mode == "long_poll":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), self.poll_timeout)
        if not fut.done():
            return self._ok({"type": "try_again", "request_id": rid, "queue_state": "active"})
        del self._jobs[rid]
        return web.Response(body=fut.result(), content_type="application/json")
