"""The HTTP side of the local server: the routes of PROTOCOL.md §2, auth, JSON/MessagePack, error bodies.

Requests are decoded with the shared msgspec structs (``hpcai_async.types``), so the bodies the official SDK
sends are accepted as they are: ``null`` inside nested objects, integers for floats, ``type`` present or
absent, unknown fields ignored. A body with ``Content-Type: application/msgpack`` is read as MessagePack
(tensors as raw little-endian bytes); an answer is MessagePack when the request's ``Accept`` names
``application/msgpack``, else JSON. Every error answer is ``{"error": <exception class>, "message": <what was
wrong and how to fix it>}`` with the status of ``hpcai_async._errors``.

Bad input is rejected here, before anything is queued, and changes no state; a job that fails while running
resolves its future to a 200 ``{"error", "message"}`` body. Routes never wait on the engine: the scheduler
runs it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import msgspec
from aiohttp import web

from .. import _tensor, types
from .._errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    error_for_status,
)
from .engine_api import EngineAPI, SampleJob
from .ordering import ReleaseSeqRequest
from .scheduler import ModelState, Record, Scheduler, error_response
from .store import (
    CheckpointMeta,
    RunRecord,
    Store,
    check_name,
    checkpoint_id_for,
    checkpoint_path_for,
    utcnow,
)

__all__ = ("DIALECTS", "FEATURES", "MAX_LORA_RANK", "Routes", "build_app")

log = logging.getLogger("hpcai_async.server")

T = TypeVar("T")

FEATURES = ["seq_id", "msgpack", "long_poll", "load_optimizer", "inline_result", "batch"]
# What each dialect advertises: "local" is ours (every extension); "hosted" advertises what the hosted HPC-AI
# service does (none), so a client talks to it exactly as to the hosted service (benchmarks, compatibility).
DIALECTS: dict[str, list[str]] = {"local": FEATURES, "hosted": []}
INLINE_WAIT_HEADER = "X-HpcAI-Async-Inline-Wait"  # seconds the submit may be held for the result
INLINE_WAIT_MAX = 0.05  # s: a held submit still answers quickly; longer jobs are long-polled as usual
MAX_LORA_RANK = 256
DEFAULT_LORA_RANK = 32  # the SDK's create_lora_training_client default
MAX_BODY_BYTES = 1 << 30
_MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
_JSON_ENCODER = msgspec.json.Encoder(enc_hook=_tensor.json_enc_hook)
_MSGPACK_ENCODER = msgspec.msgpack.Encoder(enc_hook=_tensor.msgpack_enc_hook)
_DECODERS: dict[tuple[type[Any], bool], Any] = {}
_PATH_RE = re.compile(r" - at `\$\.?(.*)`$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BATCH_MAX_ITEMS = 1024
BATCH_POLL_GRACE = 0.005  # s: the polls of a batch wait this much longer once one of them has its result
# The routes a batch may carry: the requests that submit a job, get_info and polls; not REST.
BATCH_ROUTES = (
    "retrieve_future",
    "get_info",
    "unload_model",
    "forward",
    "forward_backward",
    "optim_step",
    "save_weights",
    "save_weights_for_sampler",
    "load_weights",
    "asample",
)


class Incoming(Protocol):
    """What a route handler reads of a request: an HTTP request, or one request of a batch."""

    @property
    def path(self) -> str: ...

    @property
    def content_type(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes: ...


@dataclasses.dataclass(frozen=True, slots=True)
class _BatchItem:
    """One request of a ``POST /api/v1/batch``: its own path, body and key; the batch's other headers."""

    path: str
    content_type: str
    headers: Mapping[str, str]
    body: bytes

    async def read(self) -> bytes:
        return self.body


# ------------------------------------------------------------------------------------------------ codecs


def _decoder(cls: type[T], msgpack: bool) -> Any:
    dec = _DECODERS.get((cls, msgpack))
    if dec is None:
        dec = _DECODERS[(cls, msgpack)] = (msgspec.msgpack.Decoder if msgpack else msgspec.json.Decoder)(cls)
    return dec


def _friendly(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Expected `int`, got `str` - at `$.a.b[0]``` as ``a.b[0]: expected `int`, got `str```."""
    text = str(exc)
    match = _PATH_RE.search(text)
    where = ""
    if match:
        where = match.group(1)
        text = text[: match.start()]
    text = text[:1].lower() + text[1:]
    if text.startswith("object missing required field"):
        text = "missing required field" + text[len("object missing required field") :]
    if where:
        return f"invalid request body: {where}: {text}"
    return f"invalid request body: {text}"


async def decode_body(request: Incoming, cls: type[T]) -> tuple[T, bytes]:
    """The body as ``cls`` (JSON, or MessagePack by Content-Type) and its raw bytes; 400 naming the field."""
    raw = await request.read()
    msgpack = request.content_type in _MSGPACK_TYPES
    if not raw:
        raise BadRequestError(
            f"the request body is empty; send a {'MessagePack' if msgpack else 'JSON'} object "
            f"({cls.__name__})"
        )
    try:
        return _decoder(cls, msgpack).decode(raw), raw
    except msgspec.ValidationError as exc:
        raise BadRequestError(_friendly(exc)) from None
    except msgspec.DecodeError as exc:
        kind = "MessagePack" if msgpack else "JSON"
        raise BadRequestError(
            f"the request body is not valid {kind} ({exc}); send Content-Type: "
            f"{'application/msgpack' if msgpack else 'application/json'} with a {kind} object"
        ) from None


def _wants_msgpack(request: Incoming) -> bool:
    return "application/msgpack" in request.headers.get("Accept", "")


def encode_for(request: Incoming, obj: Any) -> bytes:
    """``obj`` as MessagePack if the request's Accept names it, else JSON."""
    return (_MSGPACK_ENCODER if _wants_msgpack(request) else _JSON_ENCODER).encode(obj)


def reply(request: Incoming, obj: Any, status: int = 200) -> web.Response:
    content_type = "application/msgpack" if _wants_msgpack(request) else "application/json"
    return web.Response(body=encode_for(request, obj), status=status, content_type=content_type)


def _inline_wait(request: Incoming) -> float:
    """How long the client will wait for the result inside the submit answer ("inline_result")."""
    try:
        return min(float(request.headers.get(INLINE_WAIT_HEADER, 0)), INLINE_WAIT_MAX)
    except ValueError:
        return 0.0


def error_reply(request: Incoming, status: int, error: str, message: str) -> web.Response:
    return reply(request, types.ErrorResponse(error=error, message=message), status)


class _SeqOnly(msgspec.Struct):
    """Just the ordering fields of a per-model request (read when the rest of the body is invalid)."""

    model_id: str
    seq_id: int | msgspec.UnsetType = msgspec.UNSET


def _fingerprint(request: Incoming, raw: bytes) -> bytes:
    return hashlib.sha256(request.path.encode() + b"\0" + raw).digest()


def _seq(value: int | msgspec.UnsetType) -> int | None:
    if value is msgspec.UNSET:
        return None
    assert isinstance(value, int)
    if value < 1:
        raise BadRequestError(
            f"seq_id: must be a positive integer (the first request after create_model is 1), got {value}"
        )
    return value


def _field_error(field: str, exc: Exception) -> BadRequestError:
    """An engine's validation error, prefixed with the request field the engine saw (``data[0]``…)."""
    message = exc.message if isinstance(exc, APIError) else str(exc)
    sep = "." if message.startswith(("data", "loss_fn")) else ": "
    return BadRequestError(f"{field}{sep}{message}")


# ------------------------------------------------------------------------------------------------ routes


class Routes:
    """The route handlers, bound to one scheduler, store and API key."""

    def __init__(
        self,
        scheduler: Scheduler,
        store: Store,
        api_key: str,
        io: concurrent.futures.Executor,
        dialect: str = "local",
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {sorted(DIALECTS)}, got {dialect[:50]!r}")
        self.features = DIALECTS[dialect]
        self.scheduler = scheduler
        self.store = store
        self.api_key = api_key
        self.io = io
        self._batch_routes: dict[str, Callable[[Incoming], Awaitable[web.Response]]] = {
            name: getattr(self, name) for name in BATCH_ROUTES
        }

    @property
    def engine(self) -> EngineAPI:
        engine = self.scheduler.engine
        if engine is None:
            raise InternalServerError("the server is shutting down")
        return engine

    # -------------------------------------------------------------------------------------------- helpers

    async def _future(self, request: Incoming, record: Record) -> web.Response:
        """The future of a submitted job; with the result inside when the client asked to wait for it."""
        future = types.UntypedAPIFuture(request_id=record.request_id, model_id=record.model_id)
        wait = _inline_wait(request)
        if wait > 0 and await self.scheduler.wait(record, wait):
            outcome = record.error if record.error is not None else record.result
            future.result = msgspec.Raw(encode_for(request, outcome))
            self.scheduler.delivered(record)
        return reply(request, future)

    def _supported(self) -> list[str]:
        return [m.model_name for m in self.engine.supported_models() if m.model_name]

    def _check_base_model(self, base_model: str, field: str = "base_model") -> None:
        if not self.engine.has_model(base_model):
            raise BadRequestError(
                f"{field}: {base_model!r} is not served here; this server has {', '.join(self._supported())} "
                "(GET /api/v1/get_server_capabilities lists them; start the server with --model to add one)"
            )

    def _model(self, model_id: str) -> ModelState:
        """The live model ``model_id``, or 404 saying why not and what to do."""
        model = self.scheduler.models.get(model_id)
        resume = (
            "its checkpoints are kept: resume with ServiceClient.create_training_client_from_state(<path>) "
            f"(GET /api/v1/training_runs/{model_id}/checkpoints lists the paths)"
        )
        if model is None:
            if self.store.get_run(model_id) is not None:
                raise NotFoundError(
                    f"model {model_id} is not loaded: it was created before this server started; {resume}"
                )
            raise NotFoundError(
                f"unknown model_id {model_id!r}; create a model first (create_model, or "
                "ServiceClient.create_lora_training_client)"
            )
        if model.status in ("unloading", "unloaded"):
            raise NotFoundError(f"model {model_id} was unloaded; {resume}")
        if model.status == "failed":
            raise NotFoundError(f"model {model_id} could not be created ({model.failure}); create a new one")
        return model

    def _ready_for_validation(self, model: ModelState) -> bool:
        # A model still being created is not in the engine yet; its requests are checked when they run.
        return self.engine.has_run(model.model_id)

    async def _ordered(
        self,
        request: Incoming,
        cls: type[Any],
        kind: str,
        prepare: Callable[[Any, ModelState], Callable[[], Any]],
        **extra: Any,
    ) -> web.Response:
        """The path of every per-model request: decode, dedupe, check, queue in order, answer the future.

        A request with a seq_id that is rejected still takes its turn (as a no-op), so the model's later
        requests do not wait for it.
        """
        raw = await request.read()
        fingerprint = _fingerprint(request, raw)
        try:
            req, _ = await decode_body(request, cls)
        except BadRequestError as exc:
            self._skip(request, raw, fingerprint, exc)
            raise
        key = request.headers.get("X-Idempotency-Key") or None
        seq = _seq(req.seq_id)
        dup = self.scheduler.find_duplicate(key, fingerprint, req.model_id, seq)
        if dup is not None:
            return await self._future(request, dup)
        model = self._model(req.model_id)
        try:
            fn = prepare(req, model)
        except Exception as exc:  # even a server error: the seq_id's turn passes, later ones do not wait
            if seq is not None:
                self.scheduler.skip_seq(model.model_id, seq, fingerprint, exc)
            raise
        on_release, on_done = extra.get("on_release"), extra.get("on_done")
        record = self.scheduler.submit(
            kind,
            fn,
            fingerprint=fingerprint,
            idem_key=key,
            model_id=model.model_id,
            seq_id=seq,
            ordered=True,
            on_release=on_release(model) if on_release else None,
            on_done=on_done(model) if on_done else None,
        )
        self.store.touch(model.model_id)
        return await self._future(request, record)

    def _skip(self, request: Incoming, raw: bytes, fingerprint: bytes, error: APIError) -> None:
        """For a body that failed to decode: if model_id and seq_id can still be read, pass that turn."""
        try:
            ids = _decoder(_SeqOnly, request.content_type in _MSGPACK_TYPES).decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        if isinstance(ids.seq_id, int) and ids.model_id in self.scheduler.models:
            self.scheduler.skip_seq(ids.model_id, ids.seq_id, fingerprint, error)

    # -------------------------------------------------------------------------------------------- service

    async def healthz(self, request: web.Request) -> web.Response:
        return reply(request, types.HealthResponse(status="ok"))

    async def capabilities(self, request: web.Request) -> web.Response:
        return reply(
            request,
            types.GetServerCapabilitiesResponse(
                supported_models=self.engine.supported_models(), features=self.features
            ),
        )

    async def telemetry(self, request: web.Request) -> web.Response:
        await request.read()  # accepted and discarded
        return reply(request, {"status": "accepted"})

    # -------------------------------------------------------------------------------------------- models

    async def create_model(self, request: web.Request) -> web.Response:
        req, raw = await decode_body(request, types.CreateModelRequest)
        fingerprint = _fingerprint(request, raw)
        key = request.headers.get("X-Idempotency-Key") or None
        dup = self.scheduler.find_duplicate(key, fingerprint)
        if dup is not None:
            return await self._future(request, dup)
        self._check_base_model(req.base_model)
        lora = req.lora_config or types.LoraConfig(rank=DEFAULT_LORA_RANK)
        if not 1 <= lora.rank <= MAX_LORA_RANK:
            raise BadRequestError(f"lora_config.rank: must be between 1 and {MAX_LORA_RANK}, got {lora.rank}")
        if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
            raise BadRequestError(
                "lora_config: train_attn, train_mlp and train_unembed are all false, so nothing would train; "
                "set at least one to true"
            )
        model_id = str(uuid.uuid4())
        owner = request.headers.get("X-Username") or "local"
        base_model = req.base_model
        model = ModelState(model_id=model_id, base_model=base_model, lora_config=lora)
        self.scheduler.models[model_id] = model
        engine, store = self.engine, self.store

        def run() -> types.CreateModelResponse:
            engine.create_run(model_id, base_model, lora)
            now = utcnow()
            store.add_run(
                RunRecord(
                    run_id=model_id,
                    base_model=base_model,
                    lora_config=lora,
                    owner=owner,
                    created=now,
                    last_request_time=now,
                )
            )
            return types.CreateModelResponse(model_id=model_id)

        def done(record: Record) -> None:
            if record.error is None:
                model.status = "ready"
            else:
                model.status, model.failure = "failed", record.error.message

        record = self.scheduler.submit(
            "create_model", run, fingerprint=fingerprint, idem_key=key, model_id=model_id, on_done=done
        )
        return await self._future(request, record)

    def _info(self, model_id: str) -> types.GetInfoResponse:
        model = self.scheduler.models.get(model_id)
        run = self.store.get_run(model_id)
        if model is not None:
            base, lora = model.base_model, model.lora_config
        elif run is not None:
            base, lora = run.base_model, run.lora_config
        else:
            raise NotFoundError(f"unknown model_id {model_id!r}; create a model first (create_model)")
        arch = None
        if self.engine.has_model(base):
            arch = self.engine.spec(base).arch
        return types.GetInfoResponse(
            model_data=types.ModelData(arch=arch, model_name=base),
            model_id=model_id,
            is_lora=True,
            lora_rank=lora.rank,
            model_name=base,
            next_seq_id=model.order.next_seq_id if model is not None and "seq_id" in self.features else None,
        )

    async def get_info(self, request: Incoming) -> web.Response:
        req, raw = await decode_body(request, types.ModelIdRequest)
        seq = _seq(req.seq_id)
        info = self._info(req.model_id)
        if seq is None:
            return reply(request, info)
        if info.next_seq_id is not None:  # this request takes seq_id's turn: the next one is after it
            info.next_seq_id = max(info.next_seq_id, seq + 1)
        # With a seq_id, get_info takes its turn in the model's sequence (it answers directly, though).
        fingerprint = _fingerprint(request, raw)
        key = request.headers.get("X-Idempotency-Key") or None
        record = self.scheduler.find_duplicate(key, fingerprint, req.model_id, seq)
        if record is None:
            record = self.scheduler.submit(
                "get_info",
                lambda: info,
                fingerprint=fingerprint,
                idem_key=key,
                model_id=req.model_id,
                seq_id=seq,
                ordered=True,
            )
        return await self._direct(request, record)

    async def _direct(self, request: Incoming, record: Record) -> web.Response:
        """Wait for ``record`` and answer its result directly (for the synchronous routes)."""
        if not await self.scheduler.wait(record, None):
            return error_reply(
                request, 503, "InternalServerError", "the server is shutting down; retry later"
            )
        self.scheduler.delivered(record)
        if record.error is not None:
            return reply(request, record.error, _status_of(record.error.error))
        return reply(request, record.result)

    async def unload_model(self, request: Incoming) -> web.Response:
        engine, store = self.engine, self.store

        def prepare(req: types.ModelIdRequest, model: ModelState) -> Callable[[], Any]:
            def run() -> types.UnloadModelResponse:
                engine.unload(model.model_id)
                store.flush()
                return types.UnloadModelResponse(model_id=model.model_id)

            return run

        def on_release(model: ModelState) -> Callable[[], None]:
            def release() -> None:
                model.status = "unloading"

            return release

        def on_done(model: ModelState) -> Callable[[Record], None]:
            def done(record: Record) -> None:
                model.status = "unloaded" if record.error is None else "ready"

            return done

        return await self._ordered(
            request, types.ModelIdRequest, "unload_model", prepare, on_release=on_release, on_done=on_done
        )

    # -------------------------------------------------------------------------------------------- training

    def _batch(self, field: str, backward: bool) -> Callable[[Any, ModelState], Callable[[], Any]]:
        engine = self.engine

        def prepare(req: Any, model: ModelState) -> Callable[[], Any]:
            batch: types.ForwardBackwardInput = getattr(req, field)
            if self._ready_for_validation(model):
                try:
                    engine.validate_batch(model.model_id, batch.data, batch.loss_fn)
                except (APIError, ValueError, TypeError) as exc:
                    raise _field_error(field, exc) from None
            call = engine.forward_backward if backward else engine.forward
            return lambda: call(model.model_id, batch.data, batch.loss_fn)

        return prepare

    async def forward(self, request: Incoming) -> web.Response:
        return await self._ordered(
            request, types.ForwardRequest, "forward", self._batch("forward_input", False)
        )

    async def forward_backward(self, request: Incoming) -> web.Response:
        return await self._ordered(
            request,
            types.ForwardBackwardRequest,
            "forward_backward",
            self._batch("forward_backward_input", True),
        )

    async def optim_step(self, request: Incoming) -> web.Response:
        engine = self.engine

        def prepare(req: types.OptimStepRequest, model: ModelState) -> Callable[[], Any]:
            p = req.adam_params
            checks: list[tuple[str, float, bool, str]] = [
                ("learning_rate", p.learning_rate, p.learning_rate >= 0, ">= 0"),
                ("beta1", p.beta1, 0 <= p.beta1 < 1, "in [0, 1)"),
                ("beta2", p.beta2, 0 <= p.beta2 < 1, "in [0, 1)"),
                ("eps", p.eps, p.eps >= 0, ">= 0"),
            ]
            for name, value in (("weight_decay", p.weight_decay), ("grad_clip_norm", p.grad_clip_norm)):
                if isinstance(value, int | float):
                    checks.append((name, value, value >= 0, ">= 0"))
            for name, value, ok, rule in checks:
                if not (ok and math.isfinite(value)):
                    raise BadRequestError(f"adam_params.{name}: must be finite and {rule}, got {value}")
            return lambda: engine.optim_step(model.model_id, p)

        return await self._ordered(request, types.OptimStepRequest, "optim_step", prepare)

    # -------------------------------------------------------------------------------------------- weights

    def _save(self, kind: str) -> Callable[[Any, ModelState], Callable[[], Any]]:
        engine, store = self.engine, self.store

        def prepare(req: types.SaveWeightsRequest, model: ModelState) -> Callable[[], Any]:
            if req.path is msgspec.UNSET or req.path is None:
                name = f"auto-{utcnow():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
            else:
                assert isinstance(req.path, str)
                name = check_name(req.path, "path")
            ckpt_id = checkpoint_id_for(name, kind)
            path = checkpoint_path_for(model.model_id, ckpt_id, kind)

            def run() -> Any:
                work = store.new_work_dir()
                try:
                    engine.save(model.model_id, work, optimizer=kind == "training")
                    meta = CheckpointMeta(
                        checkpoint_id=ckpt_id,
                        checkpoint_type="training" if kind == "training" else "sampler",
                        time=utcnow(),
                        checkpoint_path=path,
                        run_id=model.model_id,
                        base_model=model.base_model,
                        lora_config=model.lora_config,
                        name=name,
                    )
                    store.commit_checkpoint(work, meta)
                except BaseException:
                    store.discard_work_dir(work)
                    raise
                store.flush()
                if kind == "training":
                    return types.SaveWeightsResponse(path=path)
                return types.SaveWeightsForSamplerResponse(path=path)

            return run

        return prepare

    async def save_weights(self, request: Incoming) -> web.Response:
        return await self._ordered(request, types.SaveWeightsRequest, "save_weights", self._save("training"))

    async def save_weights_for_sampler(self, request: Incoming) -> web.Response:
        return await self._ordered(
            request, types.SaveWeightsRequest, "save_weights_for_sampler", self._save("sampler")
        )

    async def load_weights(self, request: Incoming) -> web.Response:
        engine, store = self.engine, self.store

        def prepare(req: types.LoadWeightsRequest, model: ModelState) -> Callable[[], Any]:
            ref = store.resolve(req.path, "path")
            meta = ref.meta
            if meta.base_model != model.base_model:
                raise BadRequestError(
                    f"path: {req.path!r} was trained on {meta.base_model!r} but model {model.model_id} uses "
                    f"{model.base_model!r}; create a model on {meta.base_model!r} to load it "
                    "(create_training_client_from_state does this)"
                )
            have, want = model.lora_config, meta.lora_config
            mismatch = [
                f"{name} {getattr(want, name)} (model has {getattr(have, name)})"
                for name in ("rank", "train_attn", "train_mlp", "train_unembed")
                if getattr(want, name) != getattr(have, name)
            ]
            if mismatch:
                raise BadRequestError(
                    f"path: {req.path!r} has a different LoRA layout: {', '.join(mismatch)}; create the "
                    "model with the checkpoint's lora_config to load it"
                )
            if req.optimizer is msgspec.UNSET:
                optimizer = meta.checkpoint_type == "training"
            else:
                optimizer = bool(req.optimizer)
                if optimizer and meta.checkpoint_type != "training":
                    raise BadRequestError(
                        f"optimizer: {req.path!r} is a sampler checkpoint and holds no optimizer state; "
                        "load it with optimizer=false, or load a training checkpoint (save_state)"
                    )
            directory, path = ref.directory, req.path

            def run() -> types.LoadWeightsResponse:
                engine.load(model.model_id, directory, optimizer=optimizer)
                return types.LoadWeightsResponse(path=path)

            return run

        return await self._ordered(request, types.LoadWeightsRequest, "load_weights", prepare)

    # -------------------------------------------------------------------------------------------- sampling

    def _sample_job(self, req: types.SampleRequest) -> SampleJob:
        base = req.base_model if isinstance(req.base_model, str) else None
        adapter = None
        model_path = req.model_path if isinstance(req.model_path, str) else None
        if model_path is not None:
            ref = self.store.resolve(model_path, "model_path")
            if base is not None and base != ref.meta.base_model:
                raise BadRequestError(
                    f"base_model: {base!r} does not match model_path {model_path!r}, which was trained on "
                    f"{ref.meta.base_model!r}; leave base_model out or make them agree"
                )
            base, adapter = ref.meta.base_model, ref.directory
        if base is None:
            raise BadRequestError(
                "give base_model (sample the base model) or model_path (an hpcai:// checkpoint path) to "
                "sample from"
            )
        self._check_base_model(base)
        job = SampleJob(
            prompt=req.prompt,
            params=req.sampling_params,
            num_samples=req.num_samples,
            prompt_logprobs=req.prompt_logprobs,
            base_model=base,
            adapter_dir=adapter,
        )
        try:
            self.engine.validate_sample(job)
        except (APIError, ValueError, TypeError) as exc:
            if isinstance(exc, APIError) and not isinstance(exc, BadRequestError):
                raise
            raise BadRequestError(exc.message if isinstance(exc, APIError) else str(exc)) from None
        return job

    async def _submit_sample(self, request: Incoming) -> Record:
        req, raw = await decode_body(request, types.SampleRequest)
        fingerprint = _fingerprint(request, raw)
        key = request.headers.get("X-Idempotency-Key") or None
        dup = self.scheduler.find_duplicate(key, fingerprint)
        if dup is not None:
            return dup
        job = self._sample_job(req)
        return self.scheduler.submit_sample(job, fingerprint=fingerprint, idem_key=key)

    async def asample(self, request: Incoming) -> web.Response:
        return await self._future(request, await self._submit_sample(request))

    async def sample(self, request: Incoming) -> web.Response:
        return await self._direct(request, await self._submit_sample(request))

    # -------------------------------------------------------------------------------------------- futures

    async def retrieve_future(self, request: Incoming, answered: asyncio.Event | None = None) -> web.Response:
        """Long-poll a future. In a batch (``answered``: shared by its polls), the first result ends the wait
        of the others 5 ms later; those still not done answer ``try_again`` with ``queue_state="batch"``:
        poll again at once."""
        req, _ = await decode_body(request, types.FutureRetrieveRequest)
        record = self.scheduler.get(req.request_id)
        if await self._wait_for(record, answered):
            response = reply(request, record.error if record.error is not None else record.result)
            self.scheduler.delivered(record)
            if answered is not None:
                _end_polls_soon(answered)
            return response
        state = "batch" if answered is not None and answered.is_set() else "active"
        return reply(request, types.TryAgainResponse(request_id=record.request_id, queue_state=state))

    async def _wait_for(self, record: Record, answered: asyncio.Event | None) -> bool:
        return await self.scheduler.wait(record, self.scheduler.long_poll_s, until=answered)

    async def release_seq(self, request: web.Request) -> web.Response:
        """``POST /api/v1/release_seq`` ("seq_id" extension): a reserved seq_id that will never be sent."""
        req, _ = await decode_body(request, ReleaseSeqRequest)
        self.scheduler.release_seq(req.model_id, req.seq_id)
        return reply(request, {})

    # -------------------------------------------------------------------------------------------- batch

    async def batch(self, request: web.Request) -> web.Response:
        """``POST /api/v1/batch`` ("batch" extension): answer every request of the batch as if sent alone.

        The requests are taken in order (so are their seq_ids and dedupe keys) and answered together, each
        with its own status; one request failing does not fail the others. The batch's ``Accept`` and inline
        wait apply to every request. Polls (``retrieve_future``) long-poll until the first of them has its
        result; the others then answer ``try_again`` (see ``retrieve_future``).
        """
        batch, _ = await decode_body(request, types.BatchRequest)
        if len(batch.requests) > BATCH_MAX_ITEMS:
            raise BadRequestError(
                f"requests: a batch holds at most {BATCH_MAX_ITEMS} requests, got {len(batch.requests)}; "
                "split it"
            )
        shared = {
            name: value
            for name in ("Accept", INLINE_WAIT_HEADER)
            if (value := request.headers.get(name)) is not None
        }
        answered = asyncio.Event()  # set by the first poll of the batch that has its result
        answers = await asyncio.gather(
            *(self._batch_answer(request, item, shared, answered) for item in batch.requests)
        )
        return reply(request, types.BatchResponse(responses=list(answers)))

    async def _batch_answer(
        self, request: web.Request, item: types.BatchItem, shared: dict[str, str], answered: asyncio.Event
    ) -> types.BatchAnswer:
        headers = dict(shared)
        if item.idempotency_key:
            headers["X-Idempotency-Key"] = item.idempotency_key
        incoming = _BatchItem(f"/api/v1/{item.path}", request.content_type, headers, bytes(item.body))
        handler = self._batch_routes.get(item.path)
        try:
            if handler is None:
                raise BadRequestError(
                    f"path: {item.path!r} cannot be batched; a batch carries {', '.join(BATCH_ROUTES)}"
                )
            if item.path == "retrieve_future":
                response = await self.retrieve_future(incoming, answered)
            else:
                response = await handler(incoming)
        except Exception as exc:  # what the middleware would answer, for this request alone
            response = self._error_response(incoming, exc)
            if item.path == "retrieve_future":  # an unknown or expired future is an answer too
                _end_polls_soon(answered)
        assert isinstance(response.body, bytes)
        return types.BatchAnswer(status=response.status, body=msgspec.Raw(response.body))

    # -------------------------------------------------------------------------------------------- REST

    async def list_training_runs(self, request: web.Request) -> web.Response:
        limit = _query_int(request, "limit", 20, 1, 1000)
        offset = _query_int(request, "offset", 0, 0, None)
        runs, total = self.store.list_runs(limit, offset)
        return reply(
            request,
            types.TrainingRunsResponse(
                training_runs=[self.store.training_run(r) for r in runs],
                cursor=types.Cursor(offset=offset, limit=limit, total_count=total),
            ),
        )

    def _run(self, request: web.Request) -> RunRecord:
        run_id = request.match_info["run_id"]
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFoundError(
                f"training run {run_id!r} does not exist on this server; list the runs with "
                "GET /api/v1/training_runs"
            )
        return run

    async def get_training_run(self, request: web.Request) -> web.Response:
        return reply(request, self.store.training_run(self._run(request)))

    async def list_checkpoints(self, request: web.Request) -> web.Response:
        run = self._run(request)
        return reply(
            request, types.CheckpointsListResponse(checkpoints=self.store.list_checkpoints(run.run_id))
        )

    async def delete_checkpoint(self, request: web.Request) -> web.Response:
        run = self._run(request)
        ckpt = request.match_info["checkpoint_id"]
        await asyncio.get_running_loop().run_in_executor(
            self.io, self.store.delete_checkpoint, run.run_id, ckpt
        )
        return web.Response(status=204)

    async def checkpoint_archive(self, request: web.Request) -> web.StreamResponse:
        run = self._run(request)
        ckpt = request.match_info["checkpoint_id"]
        ref = self.store.get_checkpoint(run.run_id, ckpt)
        chunks = self.store.iter_archive(ref)
        loop = asyncio.get_running_loop()
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/gzip",
                "Content-Disposition": f'attachment; filename="{run.run_id}-{ckpt}.tar.gz"',
            }
        )
        response.enable_chunked_encoding()
        try:
            first = await loop.run_in_executor(self.io, next, chunks, None)  # errors here still get a status
            await response.prepare(request)
            chunk = first
            while chunk is not None:
                await response.write(chunk)
                chunk = await loop.run_in_executor(self.io, next, chunks, None)
            await response.write_eof()
        finally:
            # ValueError: still running in the io thread after a cancellation; it ends with the generator
            with contextlib.suppress(ValueError):
                chunks.close()
        return response

    # -------------------------------------------------------------------------------------------- middleware

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path != "/api/v1/healthz":
                given = request.headers.get("X-API-Key", "")
                if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                    raise AuthenticationError(
                        ("the X-API-Key header is missing" if not given else "the X-API-Key header is wrong")
                        + "; use the key the server printed at start (HPCAI_API_KEY=...) or the one given "
                        "with --api-key"
                    )
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                message = (
                    f"no such endpoint: {request.method} {request.path} (see PROTOCOL.md §2 for the routes)"
                )
            elif exc.status == 405:
                message = f"{request.path} does not accept {request.method}"
            elif exc.status == 413:
                message = f"the request body is larger than {MAX_BODY_BYTES} bytes; send smaller batches"
            else:
                message = exc.text or exc.reason
            return error_reply(request, exc.status, error_for_status(exc.status).__name__, message)
        except ConnectionError:
            raise
        except Exception as exc:
            return self._error_response(request, exc)

    @staticmethod
    def _error_response(request: Incoming, exc: Exception) -> web.Response:
        """The error answer for ``exc``: its status and message for an APIError, else a logged 500."""
        if isinstance(exc, APIError):
            response = reply(request, error_response(exc), exc.status or 500)
            if isinstance(exc, ConflictError):  # the same request conflicts however often it is retried
                response.headers["x-should-retry"] = "false"
            return response
        log.exception("unexpected error in %s", request.path)
        return error_reply(
            request, 500, "InternalServerError", f"unexpected server error: {type(exc).__name__}: {exc}"
        )


def _end_polls_soon(answered: asyncio.Event) -> None:
    """A poll of a batch has its answer: the batch's other polls end BATCH_POLL_GRACE later (if not done)."""
    if not answered.is_set():
        asyncio.get_running_loop().call_later(BATCH_POLL_GRACE, answered.set)


def _status_of(error: str) -> int:
    """The HTTP status of an ``ErrorResponse.error`` class name (500 if unknown)."""
    for status in (400, 401, 403, 404, 409, 410, 422, 429):
        if error_for_status(status).__name__ == error:
            return status
    return 500


def _query_int(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"query parameter {name}: {raw!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequestError(f"query parameter {name}: must be {bound}, got {value}")
    return value


def build_app(routes: Routes) -> web.Application:
    """The aiohttp application serving every route of PROTOCOL.md §2 under ``/api/v1``."""
    app = web.Application(middlewares=[routes.middleware], client_max_size=MAX_BODY_BYTES)
    r = routes
    app.router.add_get("/api/v1/healthz", r.healthz)
    app.router.add_get("/api/v1/get_server_capabilities", r.capabilities)
    app.router.add_post("/api/v1/create_model", r.create_model)
    app.router.add_post("/api/v1/get_info", r.get_info)
    app.router.add_post("/api/v1/unload_model", r.unload_model)
    app.router.add_post("/api/v1/forward", r.forward)
    app.router.add_post("/api/v1/forward_backward", r.forward_backward)
    app.router.add_post("/api/v1/optim_step", r.optim_step)
    app.router.add_post("/api/v1/save_weights", r.save_weights)
    app.router.add_post("/api/v1/save_weights_for_sampler", r.save_weights_for_sampler)
    app.router.add_post("/api/v1/load_weights", r.load_weights)
    app.router.add_post("/api/v1/asample", r.asample)
    app.router.add_post("/api/v1/sample", r.sample)
    app.router.add_post("/api/v1/retrieve_future", r.retrieve_future)
    app.router.add_post("/api/v1/release_seq", r.release_seq)
    app.router.add_post("/api/v1/batch", r.batch)
    app.router.add_post("/api/v1/telemetry", r.telemetry)
    app.router.add_get("/api/v1/training_runs", r.list_training_runs)
    app.router.add_get("/api/v1/training_runs/{run_id}", r.get_training_run)
    app.router.add_get("/api/v1/training_runs/{run_id}/checkpoints", r.list_checkpoints)
    app.router.add_delete("/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}", r.delete_checkpoint)
    app.router.add_get(
        "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/archive", r.checkpoint_archive
    )
    return app
