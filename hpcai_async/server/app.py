"""The HTTP side of the local server: middleware (auth, limits, error bodies) and the route table.

What a request does is ``service.py``'s; how bodies are read and written is ``codec.py``'s. A route here
reads the body, hands the decoded struct to the service, and answers the future (or, for the synchronous
routes, the result). The batch route decodes each of its requests the same way and calls the same service
methods; the REST routes (runs, checkpoints, archives) are ``rest.py``'s. ``build_app`` builds the whole
server: its lifecycle (store, engine thread, scheduler) runs in the application's ``cleanup_ctx``, so
``web.run_app(build_app(...))`` serves it as ``LocalServer`` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .. import _wire, types
from .._errors import APIStatusError, AuthenticationError, BadRequestError
from .codec import Codec
from .engine_api import EngineAPI
from .lifecycle import API_KEY, DEFAULT_LIMITS, FEATURES_KEY, LIMITS, SCHEDULER, SERVICE, Limits, lifecycle
from .ordering import ReleaseSeqRequest
from .rest import REST_ROUTES
from .scheduler import Record, Scheduler
from .service import Call, Service

__all__ = ("DIALECTS", "FEATURES", "SCHEDULER", "SERVICE", "build_app")

# The protocol extensions of the local server, one a line (a feature's client checks it with
# Transport.require before sending anything that needs it).
FEATURES = [
    "seq_id",
    "msgpack",
    "long_poll",
    "load_optimizer",
    "inline_result",
    "batch",
    "grad_acc_normalization",
    "weight_decay",  # AdamParams.weight_decay (decoupled, AdamW): Tinker's, not in hpcai's AdamParams
    "grad_clip_norm",  # AdamParams.grad_clip_norm: the global gradient norm is clipped to it
    "loss_fn_config",
    "loss:cispo",
    "loss:dro",
    "queue_duration",
    "topk_prompt_logprobs",
    "ttl",
    "checkpoint_type",  # save_weights_for_sampler checkpoint_type: "base" (full weights) or "delta" (adapter)
    "full_param",  # create_model lora_config.rank 0: every weight trains (layout.py)
    "reference_forward",  # forward reference: true, and create_model reference: true (a frozen model)
    "user_metadata",  # create_model and save user_metadata, shown by the run and checkpoint listings
]
# What each dialect advertises: "local" is ours (every extension); "hosted" advertises what the hosted HPC-AI
# service does (none), so a client talks to it exactly as to the hosted service (benchmarks, compatibility).
DIALECTS: dict[str, list[str]] = {"local": FEATURES, "hosted": []}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BATCH_MAX_ITEMS = 1024
BATCH_POLL_GRACE = 0.005  # s: the polls of a batch wait this much longer once one of them has its result

# The requests that submit a job (or answer get_info): request struct, service method, and whether the route
# answers the job's result itself (``direct``) instead of its future. get_info answers directly when it has
# no seq_id; with one it takes its turn in the model's sequence.
_Op = Callable[[Service, Any, Call], Any]
SUBMITS: dict[str, tuple[type[Any], _Op, bool]] = {
    "get_info": (types.ModelIdRequest, Service.get_info, True),
    "unload_model": (types.ModelIdRequest, Service.unload_model, False),
    "forward": (types.ForwardRequest, Service.forward, False),
    "forward_backward": (types.ForwardBackwardRequest, Service.forward_backward, False),
    "optim_step": (types.OptimStepRequest, Service.optim_step, False),
    "save_weights": (types.SaveWeightsRequest, Service.save_weights, False),
    "save_weights_for_sampler": (types.SaveWeightsRequest, Service.save_weights_for_sampler, False),
    "load_weights": (types.LoadWeightsRequest, Service.load_weights, False),
    "asample": (types.SampleRequest, Service.sample, False),
    "sample": (types.SampleRequest, Service.sample, True),
}
# The routes a batch may carry: the requests that submit a job, get_info and polls; not REST.
BATCH_ROUTES = ("retrieve_future", *(name for name in SUBMITS if name != "sample"))


def _inline_wait(headers: Mapping[str, str]) -> float:
    """How long the client will wait for the result inside the submit answer ("inline_result")."""
    return _wire.inline_wait(headers.get(_wire.INLINE_WAIT_HEADER))


def _fingerprint(path: str, raw: bytes) -> bytes:
    return hashlib.sha256(path.encode() + b"\0" + raw).digest()


# ------------------------------------------------------------------------------------------------ answers


def _queue_duration(service: Service, record: Record, response: web.Response) -> web.Response:
    """An answer carrying ``record``'s result: with "queue_duration", how long the job waited in the queue
    before the engine started it (recorded for samples), in ``X-Queue-Duration-Ms``."""
    queued = record.queued_s
    if service.queue_duration and queued is not None:
        response.headers[_wire.QUEUE_DURATION_MS] = f"{queued * 1000.0:.3f}"
    return response


async def _future(service: Service, codec: Codec, record: Record, wait: float) -> web.Response:
    """The future of a submitted job; with the result inside when the client asked to wait for it."""
    future = types.UntypedAPIFuture(request_id=record.request_id, model_id=record.model_id)
    if wait > 0 and await service.wait(record, wait):
        future.result = msgspec.Raw(codec.encode(service.take(record)))
        return _queue_duration(service, record, codec.reply(future))
    return codec.reply(future)


async def _direct(service: Service, codec: Codec, record: Record) -> web.Response:
    """Wait for ``record`` and answer its result directly (for the synchronous routes)."""
    if not await service.wait(record, None):
        return codec.error_reply(503, "the server is shutting down; retry later")
    outcome = service.take(record)
    status = _wire.status_for_error(outcome.error) if record.error is not None else 200
    return _queue_duration(service, record, codec.reply(outcome, status))


async def _submit(
    service: Service, name: str, raw: bytes, codec: Codec, key: str | None, wait: float
) -> web.Response:
    """Decode a request for route ``name``, hand it to the service, answer its future (or result)."""
    struct, op, direct = SUBMITS[name]
    call = Call(key, _fingerprint(f"/api/v1/{name}", raw))
    try:
        req = codec.decode(raw, struct)
    except BadRequestError as exc:
        ids = codec.seq_of(raw)
        if ids is not None and isinstance(ids.seq_id, int):  # the rejected request still passes its turn
            service.rejected(ids.model_id, ids.seq_id, call, exc)
        raise
    answer = op(service, req, call)
    if not isinstance(answer, Record):
        return codec.reply(answer)
    if direct:
        return await _direct(service, codec, answer)
    return await _future(service, codec, answer, wait)


async def _poll(service: Service, raw: bytes, codec: Codec, answered: asyncio.Event | None) -> web.Response:
    """Long-poll a future. In a batch (``answered``: shared by its polls), the first result ends the wait
    of the others 5 ms later; those still not done answer ``try_again`` with ``queue_state="batch"``:
    poll again at once."""
    req = codec.decode(raw, types.FutureRetrieveRequest)
    record = service.future(req.request_id)
    if await service.wait(record, service.scheduler.long_poll_s, until=answered):
        response = _queue_duration(service, record, codec.reply(service.take(record)))
        if answered is not None:
            _end_polls_soon(answered)
        return response
    state = "batch" if answered is not None and answered.is_set() else "active"
    return codec.reply(types.TryAgainResponse(request_id=record.request_id, queue_state=state))


def _end_polls_soon(answered: asyncio.Event) -> None:
    """A poll of a batch has its answer: the batch's other polls end BATCH_POLL_GRACE later (if not done)."""
    if not answered.is_set():
        asyncio.get_running_loop().call_later(BATCH_POLL_GRACE, answered.set)


async def _batch_answer(
    service: Service, item: types.BatchItem, codec: Codec, wait: float, answered: asyncio.Event
) -> types.BatchAnswer:
    """One request of a batch, answered as if sent alone (its error too: one failing fails no other)."""
    body = bytes(item.body)
    try:
        if item.path == "retrieve_future":
            response = await _poll(service, body, codec, answered)
        elif item.path in BATCH_ROUTES:
            response = await _submit(service, item.path, body, codec, item.idempotency_key or None, wait)
        else:
            raise BadRequestError(
                f"path: {_wire.shorten(item.path, 100)} cannot be batched; a batch carries "
                f"{', '.join(BATCH_ROUTES)}"
            )
    except Exception as exc:  # what the middleware would answer, for this request alone
        response = codec.error(exc, f"/api/v1/batch: {item.path[:100]}")
        if item.path == "retrieve_future":  # an unknown or expired future is an answer too
            _end_polls_soon(answered)
    assert isinstance(response.body, bytes)
    answer = types.BatchAnswer(status=response.status, body=msgspec.Raw(response.body))
    if (queued := response.headers.get(_wire.QUEUE_DURATION_MS)) is not None:
        answer.headers = {_wire.QUEUE_DURATION_MS: queued}
    return answer


# ------------------------------------------------------------------------------------------------ routes


def _submit_route(name: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        raw = await request.read()
        key = request.headers.get(_wire.IDEMPOTENCY_KEY) or None
        return await _submit(
            request.app[SERVICE], name, raw, Codec.of(request), key, _inline_wait(request.headers)
        )

    handler.__name__ = name
    return handler


async def healthz(request: web.Request) -> web.Response:
    return Codec.of(request).reply(types.HealthResponse(status="ok"))


async def capabilities(request: web.Request) -> web.Response:
    response = types.GetServerCapabilitiesResponse(
        supported_models=request.app[SERVICE].supported_models(), features=request.app[FEATURES_KEY]
    )
    return Codec.of(request).reply(response)


async def telemetry(request: web.Request) -> web.Response:
    await request.read()  # accepted and discarded
    return Codec.of(request).reply({"status": "accepted"})


async def create_model(request: web.Request) -> web.Response:
    codec, raw = Codec.of(request), await request.read()
    req = codec.decode(raw, types.CreateModelRequest)
    call = Call(request.headers.get(_wire.IDEMPOTENCY_KEY) or None, _fingerprint(request.path, raw))
    record = request.app[SERVICE].create_model(req, call, owner=request.headers.get("X-Username") or "local")
    return await _future(request.app[SERVICE], codec, record, _inline_wait(request.headers))


async def retrieve_future(request: web.Request) -> web.Response:
    return await _poll(request.app[SERVICE], await request.read(), Codec.of(request), None)


async def release_seq(request: web.Request) -> web.Response:
    """``POST /api/v1/release_seq`` ("seq_id" extension): a reserved seq_id that will never be sent."""
    codec = Codec.of(request)
    request.app[SERVICE].release_seq(codec.decode(await request.read(), ReleaseSeqRequest))
    return codec.reply({})


async def batch(request: web.Request) -> web.Response:
    """``POST /api/v1/batch`` ("batch" extension): answer every request of the batch as if sent alone.

    The requests are taken in order (so are their seq_ids and dedupe keys) and answered together, each
    with its own status; one request failing does not fail the others. The batch's ``Accept`` and inline
    wait apply to every request. Polls (``retrieve_future``) long-poll until the first of them has its
    result; the others then answer ``try_again`` (see ``_poll``).
    """
    codec, service = Codec.of(request), request.app[SERVICE]
    items = codec.decode(await request.read(), types.BatchRequest).requests
    if len(items) > BATCH_MAX_ITEMS:
        raise BadRequestError(
            f"requests: a batch holds at most {BATCH_MAX_ITEMS} requests, got {len(items)}; split it"
        )
    wait, answered = _inline_wait(request.headers), asyncio.Event()  # set by the first poll with a result
    answers = await asyncio.gather(*(_batch_answer(service, item, codec, wait, answered) for item in items))
    return codec.reply(types.BatchResponse(responses=list(answers)))


# ------------------------------------------------------------------------------------------------ middleware


def _check_key(request: web.Request) -> None:
    given = request.headers.get(_wire.API_KEY, "")
    expected = request.app[API_KEY]
    # surrogateescape: a header's non-UTF-8 bytes come back as they were sent (and simply do not match)
    if not given or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
        raise AuthenticationError(
            ("the X-API-Key header is missing" if not given else "the X-API-Key header is wrong")
            + "; use the key the server printed at start (HPCAI_API_KEY=...) or the one given with --api-key"
        )


def _too_large(limit: int) -> APIStatusError:
    return APIStatusError(
        f"the request body is larger than this server's limit of {limit / 2**20:g} MiB ({limit} bytes, "
        "counted after gzip inflation); send the data in several smaller requests (split a forward_backward "
        "batch into a few calls before one optim_step, or sample fewer prompts per call), or start the "
        "server with a larger --max-body-mb (LocalServer(max_body_bytes=...))",
        status=413,
    )


async def _read_body(request: web.Request) -> None:
    """Read the whole body now, within the body deadline and the size limit (after gzip inflation too).

    aiohttp inflates a gzip body in bounded pieces and stops at the limit, so a small compressed body never
    grows into a large one in memory. Routes then read the body from aiohttp's cache.
    """
    if not request.body_exists:
        return
    limits = request.app[LIMITS]
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise _too_large(limits.max_body_bytes)
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            await request.read()
    except TimeoutError:
        raise APIStatusError(
            f"the request body did not arrive within {limits.body_timeout_s:g} s; send it at once "
            "(a connection that stalls mid-body is dropped)",
            status=408,
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limits.max_body_bytes) from None
    except RequestPayloadError as exc:
        encoding = request.headers.get("Content-Encoding")
        if encoding:
            raise BadRequestError(
                f"the request body is not valid {_wire.shorten(encoding, 50)} (its Content-Encoding); "
                "compress it with that encoding, or send it uncompressed without the header"
            ) from None
        raise BadRequestError(f"the request body could not be read: {exc}") from None


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        message = f"no such endpoint: {request.method} {request.path} (see PROTOCOL.md §2 for the routes)"
    elif exc.status == 405:
        message = f"{request.path} does not accept {request.method}"
    else:
        message = exc.text or exc.reason
    return Codec.of(request).error_reply(exc.status, message)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path != "/api/v1/healthz":
            _check_key(request)
        await _read_body(request)
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(request, exc)
    except ConnectionError:
        raise
    except Exception as exc:
        response = Codec.of(request).error(exc, request.path)
        if response.status in (408, 413):  # the rest of the body is not read: this connection cannot go on
            response.force_close()  # (aiohttp reads and drops what still comes for a while, then closes)
        if response.status == 408 and request.transport is not None:  # a stalled client: drop it now
            await response.prepare(request)
            await response.write_eof()
            request.transport.close()
        return response


# ------------------------------------------------------------------------------------------------ the app


def build_app(
    engine: Callable[[], EngineAPI],
    *,
    api_key: str,
    store: str | os.PathLike[str] | None = None,
    scheduler: Scheduler | None = None,
    dialect: str = "local",
    close_engine: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> web.Application:
    """The aiohttp application serving every route of PROTOCOL.md §2 under ``/api/v1``.

    ``engine`` is called on the device thread when the app starts; ``store``: the runs folder (None: a
    temporary one, deleted at cleanup); ``scheduler``: one to use (its timeouts), else a default one;
    ``close_engine``: whether cleanup closes the engine (False for one shared across servers); ``limits``:
    the body size and body deadline. The head deadline belongs to the runner: ``LocalServer`` passes
    ``keepalive_timeout=HEAD_TIMEOUT_S``; pass it to ``web.run_app`` too.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {sorted(DIALECTS)}, got {dialect[:50]!r}")
    scheduler = scheduler or Scheduler()
    app = web.Application(middlewares=[middleware], client_max_size=limits.max_body_bytes)
    app[SCHEDULER], app[API_KEY], app[FEATURES_KEY] = scheduler, api_key, DIALECTS[dialect]
    app[LIMITS] = limits

    async def wake(app: web.Application) -> None:
        scheduler.wake_all()  # long-polls answer now, before the server waits for open requests to end

    features = DIALECTS[dialect]
    app.cleanup_ctx.append(
        lifecycle(scheduler, engine, store, close_engine, "seq_id" in features, "queue_duration" in features)
    )
    app.on_shutdown.append(wake)
    app.router.add_get("/api/v1/healthz", healthz)
    app.router.add_get("/api/v1/get_server_capabilities", capabilities)
    app.router.add_post("/api/v1/create_model", create_model)
    for name in SUBMITS:
        app.router.add_post(f"/api/v1/{name}", _submit_route(name))
    app.router.add_post("/api/v1/retrieve_future", retrieve_future)
    app.router.add_post("/api/v1/release_seq", release_seq)
    app.router.add_post("/api/v1/batch", batch)
    app.router.add_post("/api/v1/telemetry", telemetry)
    app.router.add_routes(REST_ROUTES)
    return app
