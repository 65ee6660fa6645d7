"""What each request does once decoded: model lifecycle, checkpoint rules, and the futures they answer.

Every method takes a decoded request struct and a ``Call`` (the idempotency key and the fingerprint of the
route and body, which dedupe it), checks the request, and answers a ``Record`` -- the future -- at once;
nothing here waits for the engine or knows HTTP, so ``app.py``'s routes and its batch route call the same
methods. Bad input raises a typed ``APIError`` before anything is queued and changes no state; a job that
fails while it runs resolves its future to an error (``Record.error``).

A model's status (``ModelState.status``) moves: ``creating`` -> ``ready`` (its create_model job ran) or
``failed``; ``ready`` -> ``unloading`` (its unload_model request's turn came) -> ``unloaded`` (or back to
``ready`` if unloading failed). Only ``ready`` and ``creating`` models take requests. What a save is named
and writes, and which checkpoints a model may load, are ``checkpoints.py``'s rules, which the service applies.
(Over 400 lines: one method per protocol operation, each short; the rules they apply live elsewhere.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from .. import types
from .._errors import APIError, BadRequestError, InternalServerError, NotFoundError
from .._wire import shorten
from . import checkpoints
from .engine_api import EngineAPI, SampleJob, check_adam
from .layout import DEFAULT_LORA_RANK, check_create, check_trainable, is_lora
from .ordering import ReleaseSeqRequest
from .scheduler import ModelState, Record, Scheduler
from .store import RunRecord, Store, utcnow

__all__ = ("DEFAULT_LORA_RANK", "Call", "Service")

Prepare = Callable[[Any, ModelState], Callable[[], Any]]


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """What dedupes a request: its ``X-Idempotency-Key`` (None without one), a hash of its route and body."""

    key: str | None
    fingerprint: bytes


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


class Service:
    """The server's operations, bound to one scheduler (futures, ordering, the engine) and one store."""

    def __init__(
        self,
        scheduler: Scheduler,
        store: Store,
        io: concurrent.futures.Executor,
        *,
        seq_ids: bool = True,
        queue_duration: bool = True,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.io = io  # for blocking store work on the event loop's behalf (REST routes)
        self.seq_ids = seq_ids  # the "seq_id" extension is advertised: get_info tells next_seq_id
        self.queue_duration = queue_duration  # "queue_duration" is advertised: results say their wait

    @property
    def engine(self) -> EngineAPI:
        engine = self.scheduler.engine
        if engine is None:
            raise InternalServerError("the server is shutting down")
        return engine

    def supported_models(self) -> list[types.SupportedModel]:
        return self.engine.supported_models()

    # -------------------------------------------------------------------------------------------- rules

    def _check_base_model(self, base_model: str, field: str = "base_model") -> None:
        if not self.engine.has_model(base_model):
            served = ", ".join(m.model_name for m in self.supported_models() if m.model_name)
            raise BadRequestError(
                f"{field}: {shorten(base_model)} is not served here; this server has {served} "
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
                    f"model {model_id} is not loaded (unloaded, or created before this server started); "
                    + resume
                )
            raise NotFoundError(
                f"unknown model_id {shorten(model_id)}; create a model first (create_model, or "
                "ServiceClient.create_lora_training_client)"
            )
        if model.status in ("unloading", "unloaded"):
            raise NotFoundError(f"model {model_id} was unloaded; {resume}")
        if model.status == "failed":
            raise NotFoundError(f"model {model_id} could not be created ({model.failure}); create a new one")
        return model

    def _ordered(
        self, kind: str, req: Any, call: Call, prepare: Prepare, **hooks: Callable[[ModelState], Any]
    ) -> Record:
        """The path of every per-model request: dedupe, check, queue in order, answer the future.

        A request with a seq_id that is rejected still takes its turn (as a no-op), so the model's later
        requests do not wait for it.
        """
        seq = _seq(req.seq_id)
        dup = self.scheduler.find_duplicate(call.key, call.fingerprint, req.model_id, seq)
        if dup is not None:
            return dup
        model = self._model(req.model_id)
        try:
            fn = prepare(req, model)
        except Exception as exc:  # even a server error: the seq_id's turn passes, later ones do not wait
            if seq is not None:
                self.scheduler.skip_seq(model.model_id, seq, call.fingerprint, exc)
            raise
        on_release, on_done = hooks.get("on_release"), hooks.get("on_done")
        record = self.scheduler.submit(
            kind,
            fn,
            fingerprint=call.fingerprint,
            idem_key=call.key,
            model_id=model.model_id,
            seq_id=seq,
            ordered=True,
            on_release=on_release(model) if on_release else None,
            on_done=on_done(model) if on_done else None,
        )
        self.store.touch(model.model_id)
        return record

    def rejected(self, model_id: str, seq_id: int, call: Call, error: APIError) -> None:
        """A request of ``model_id`` whose body could not be decoded still passes its ``seq_id`` turn."""
        if model_id in self.scheduler.models:
            self.scheduler.skip_seq(model_id, seq_id, call.fingerprint, error)

    # -------------------------------------------------------------------------------------------- models

    def create_model(self, req: types.CreateModelRequest, call: Call, owner: str = "local") -> Record:
        dup = self.scheduler.find_duplicate(call.key, call.fingerprint)
        if dup is not None:
            return dup
        self._check_base_model(req.base_model)
        lora, frozen, metadata = check_create(req)
        model_id, base_model = str(uuid.uuid4()), req.base_model
        model = ModelState(model_id=model_id, base_model=base_model, lora_config=lora, frozen=frozen)
        self.scheduler.models[model_id] = model
        engine, store = self.engine, self.store

        def run() -> types.CreateModelResponse:
            if frozen:  # a reference model is no training run: no record, nothing to list or resume
                engine.create_run(model_id, base_model, lora, frozen=True)
                return types.CreateModelResponse(model_id=model_id)
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
                    user_metadata=metadata,
                )
            )
            return types.CreateModelResponse(model_id=model_id)

        def done(record: Record) -> None:
            if record.error is None:
                model.status = "ready"
            else:
                model.status, model.failure = "failed", record.error.message

        return self.scheduler.submit(
            "create_model",
            run,
            fingerprint=call.fingerprint,
            idem_key=call.key,
            model_id=model_id,
            on_done=done,
        )

    def info(self, model_id: str) -> types.GetInfoResponse:
        model = self.scheduler.models.get(model_id)
        run = self.store.get_run(model_id)
        if model is not None:
            base, lora = model.base_model, model.lora_config
        elif run is not None:
            base, lora = run.base_model, run.lora_config
        else:
            raise NotFoundError(f"unknown model_id {shorten(model_id)}; create a model first (create_model)")
        arch = self.engine.spec(base).arch if self.engine.has_model(base) else None
        return types.GetInfoResponse(
            model_data=types.ModelData(arch=arch, model_name=base),
            model_id=model_id,
            is_lora=is_lora(lora),
            lora_rank=lora.rank if is_lora(lora) else None,
            model_name=base,
            next_seq_id=model.order.next_seq_id if model is not None and self.seq_ids else None,
        )

    def get_info(self, req: types.ModelIdRequest, call: Call) -> types.GetInfoResponse | Record:
        """The model's info; with a seq_id, a future of it that takes its turn in the model's sequence."""
        seq = _seq(req.seq_id)
        info = self.info(req.model_id)
        if seq is None:
            return info
        if info.next_seq_id is not None:  # this request takes seq_id's turn: the next one is after it
            info.next_seq_id = max(info.next_seq_id, seq + 1)
        record = self.scheduler.find_duplicate(call.key, call.fingerprint, req.model_id, seq)
        if record is None:
            record = self.scheduler.submit(
                "get_info",
                lambda: info,
                fingerprint=call.fingerprint,
                idem_key=call.key,
                model_id=req.model_id,
                seq_id=seq,
                ordered=True,
            )
        return record

    def unload_model(self, req: types.ModelIdRequest, call: Call) -> Record:
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

        return self._ordered("unload_model", req, call, prepare, on_release=on_release, on_done=on_done)

    # -------------------------------------------------------------------------------------------- training

    def _batch(self, field: str, backward: bool) -> Prepare:
        engine = self.engine

        def prepare(req: Any, model: ModelState) -> Callable[[], Any]:
            if backward:
                check_trainable(model.model_id, model.frozen, "forward_backward")
            batch: types.ForwardBackwardInput = getattr(req, field)
            config = None if batch.loss_fn_config is msgspec.UNSET else batch.loss_fn_config
            # "reference_forward": the run's base model without its training (passed on only when asked)
            flags = {"reference": True} if getattr(req, "reference", False) is True else {}

            def check() -> Any:
                try:
                    return engine.validate_batch(model.model_id, batch.data, batch.loss_fn, config)
                except (APIError, ValueError, TypeError) as exc:
                    raise _field_error(field, exc) from None

            # A model still being created is not in the engine yet; its requests are checked when they run.
            checked = check() if engine.has_run(model.model_id) else None
            run = engine.forward_backward if backward else engine.forward
            return lambda: run(
                model.model_id, checked if checked is not None else check(), batch.loss_fn, **flags
            )

        return prepare

    def forward(self, req: types.ForwardRequest, call: Call) -> Record:
        return self._ordered("forward", req, call, self._batch("forward_input", False))

    def forward_backward(self, req: types.ForwardBackwardRequest, call: Call) -> Record:
        return self._ordered("forward_backward", req, call, self._batch("forward_backward_input", True))

    def optim_step(self, req: types.OptimStepRequest, call: Call) -> Record:
        engine = self.engine

        def prepare(req: types.OptimStepRequest, model: ModelState) -> Callable[[], Any]:
            check_trainable(model.model_id, model.frozen, "optim_step")
            mode = req.grad_accumulation_normalization
            p = check_adam(req.adam_params, "none" if mode is msgspec.UNSET else mode)
            return lambda: engine.optim_step(model.model_id, p)

        return self._ordered("optim_step", req, call, prepare)

    # -------------------------------------------------------------------------------------------- weights

    def _save(self, kind: str) -> Prepare:
        engine, store = self.engine, self.store

        def prepare(req: types.SaveWeightsRequest, model: ModelState) -> Callable[[], Any]:
            check_trainable(model.model_id, model.frozen, "save weights")
            meta = checkpoints.new_checkpoint(req, model, kind)
            if engine.has_run(model.model_id):  # a model still being created is checked when it saves
                engine.validate_save(model.model_id, merged=meta.merged)
            return lambda: checkpoints.save(engine, store, meta, kind)

        return prepare

    def save_weights(self, req: types.SaveWeightsRequest, call: Call) -> Record:
        return self._ordered("save_weights", req, call, self._save("training"))

    def save_weights_for_sampler(self, req: types.SaveWeightsRequest, call: Call) -> Record:
        return self._ordered("save_weights_for_sampler", req, call, self._save("sampler"))

    def load_weights(self, req: types.LoadWeightsRequest, call: Call) -> Record:
        engine, store = self.engine, self.store

        def prepare(req: types.LoadWeightsRequest, model: ModelState) -> Callable[[], Any]:
            check_trainable(model.model_id, model.frozen, "load weights")
            ref = store.resolve(req.path, "path")
            optimizer = checkpoints.check_loadable(req, ref.meta, model)
            directory, path = ref.directory, req.path

            def run() -> types.LoadWeightsResponse:
                engine.load(model.model_id, directory, optimizer=optimizer)
                return types.LoadWeightsResponse(path=path)

            return run

        return self._ordered("load_weights", req, call, prepare)

    # -------------------------------------------------------------------------------------------- sampling

    def _sample_job(self, req: types.SampleRequest) -> SampleJob:
        base = req.base_model if isinstance(req.base_model, str) else None
        adapter = None
        model_path = req.model_path if isinstance(req.model_path, str) else None
        if model_path is not None:
            ref = self.store.resolve(model_path, "model_path")
            if base is not None and base != ref.meta.base_model:
                raise BadRequestError(
                    f"base_model: {shorten(base)} does not match model_path {shorten(model_path)}, which was "
                    f"trained on {ref.meta.base_model!r}; leave base_model out or make them agree"
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
            topk_prompt_logprobs=req.topk_prompt_logprobs if isinstance(req.topk_prompt_logprobs, int) else 0,
            base_model=base,
            adapter_dir=adapter,
        )
        try:
            job = self.engine.validate_sample(job)
        except (APIError, ValueError, TypeError) as exc:
            if isinstance(exc, APIError) and not isinstance(exc, BadRequestError):
                raise
            raise BadRequestError(exc.message if isinstance(exc, APIError) else str(exc)) from None
        return job

    def sample(self, req: types.SampleRequest, call: Call) -> Record:
        dup = self.scheduler.find_duplicate(call.key, call.fingerprint)
        if dup is not None:
            return dup
        return self.scheduler.submit_sample(
            self._sample_job(req), fingerprint=call.fingerprint, idem_key=call.key
        )

    # -------------------------------------------------------------------------------------------- futures

    def future(self, request_id: str) -> Record:
        """The future ``request_id`` (NotFoundError if never issued, GoneError if expired)."""
        return self.scheduler.get(request_id)

    async def wait(
        self,
        record: Record,
        timeout: float | None,  # noqa: ASYNC109 (a long-poll's own deadline, not a call timeout)
        until: asyncio.Event | None = None,
    ) -> bool:
        """Wait until ``record`` is done (True), or ``timeout`` passes, ``until`` is set or the server shuts
        down (False)."""
        return await self.scheduler.wait(record, timeout, until)

    def release_seq(self, req: ReleaseSeqRequest) -> None:
        """A reserved seq_id that will never be sent: the model's later requests run without waiting."""
        self.scheduler.release_seq(req.model_id, req.seq_id)

    def take(self, record: Record) -> Any:
        """The outcome of a done ``record`` (its result, or its ``ErrorResponse``), marked as handed out."""
        self.scheduler.delivered(record)
        return record.error if record.error is not None else record.result
