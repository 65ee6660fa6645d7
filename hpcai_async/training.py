"""TrainingClient: ordered, pipelined training requests; chunked forward passes; custom losses; tokenizers.

Ordering (``_ordered``, over ``_sequence``'s numbers). Every training request takes its sequence number
``n`` (from 0, per TrainingClient) when its coroutine starts, before its first ``await``, so call order is
execution order. ``n`` is in the idempotency key ``{session}:{client}:{n}`` (PROTOCOL.md §4.1). Where the
server lists ``"seq_id"`` in its capabilities, the request also carries ``seq_id = first + n`` (``first``: 1
for a new run, the run's ``next_seq_id`` for one this client attached to) and is sent at once, concurrently
with the others, and the server restores the order (§4.2). A number that will not be sent is released at
once. Otherwise request ``n`` is sent as soon as request ``n - 1`` has been acknowledged (its POST answered),
never waiting for a previous *result*: a ``forward_backward`` and the ``optim_step`` after it are both queued
on the server before either finishes.

``fut = await tc.forward_backward_async(...)`` returns an ``APIFuture`` once the request is on its way (in
turn mode: once its POST was answered; in seq_id mode: at once), and its polling has started; ``await fut``
gives the result. A request that was called is always sent: cancelling its future only stops the wait for the
result. Checking, chunking and combining are pure functions in ``_chunks``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

import msgspec

from . import _wire
from ._checkpointing import CheckpointMethods
from ._chunks import (
    MAX_CHUNK_LEN,
    MAX_CHUNK_NUMBER_COUNT,
    CustomLossFn,
    check_data,
    chunk_data,
    combine_metrics,
    combine_outputs,
    custom_count,
    linearize,
)
from ._errors import APIError
from ._futures import APIFuture, QueueStateObserver
from ._http import Transport
from ._loop import LoopThread, blocking, mark_sync_form, on_client_loop, on_own_thread, submit
from ._ordered import Body, RunRequests, Started
from ._tokenizer import load_tokenizer
from .types import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    ForwardBackwardRequest,
    ForwardRequest,
    GetInfoResponse,
    GradAccNormalization,
    LossFnType,
    ModelIdRequest,
    OptimStepRequest,
    OptimStepResponse,
    UnloadModelResponse,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = (
    "MAX_CHUNK_LEN",
    "MAX_CHUNK_NUMBER_COUNT",
    "CustomLossFn",
    "TrainingClient",
    "check_data",
    "chunk_data",
    "combine_metrics",
    "combine_outputs",
)

T = TypeVar("T")

_KINDS = {"forward": "Forward", "forward_backward": "ForwardBackward"}  # their X-Request-Type

# --------------------------------------------------------------------------------------------- the client


class TrainingClient(CheckpointMethods, QueueStateObserver):
    """A training run on the service (LoRA, or full-parameter on our server): forward/backward passes,
    optimizer steps, checkpoints.

    Get one from ``ServiceClient.create_lora_training_client``, ``create_training_client`` or
    ``create_training_client_from_state``.
    Every operation is a coroutine ``x_async`` and a plain ``x``; training operations return an ``APIFuture``.
    """

    def __init__(
        self,
        transport: Transport,
        model_id: str,
        base_model: str | None = None,
        *,
        first_seq_id: int | None = 1,
    ) -> None:
        self._transport = transport
        self.model_id = model_id
        self.base_model = base_model
        self._orders = RunRequests(
            transport, model_id, first_seq_id=first_seq_id, on_queue_state=self._observe_queue_state
        )
        self._tokenizer: asyncio.Future[PreTrainedTokenizerBase] | None = None

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self.base_model!r})"

    def _start_chunks(
        self,
        first: int,
        path: Literal["forward", "forward_backward"],
        chunks: list[list[Datum]],
        loss_fn: LossFnType,
        loss_fn_config: dict[str, float] | None = None,
        reference: bool = False,
    ) -> list[Started[ForwardBackwardOutput]]:
        bodies = self._chunk_bodies(path, chunks, loss_fn, loss_fn_config, reference)
        return [
            self._orders.start(first + i, path, body, ForwardBackwardOutput, _KINDS[path])
            for i, body in enumerate(bodies)
        ]

    def _chunk_bodies(
        self,
        path: Literal["forward", "forward_backward"],
        chunks: list[list[Datum]],
        loss_fn: LossFnType,
        loss_fn_config: dict[str, float] | None = None,
        reference: bool = False,
    ) -> list[Body]:
        config = loss_fn_config if loss_fn_config else msgspec.UNSET
        flag = True if reference else msgspec.UNSET
        bodies: list[Body] = []
        for chunk in chunks:
            fb_input = ForwardBackwardInput(data=chunk, loss_fn=loss_fn, loss_fn_config=config)
            bodies.append(
                ForwardRequest(forward_input=fb_input, model_id=self.model_id, reference=flag)
                if path == "forward"
                else ForwardBackwardRequest(forward_backward_input=fb_input, model_id=self.model_id)
            )
        return bodies

    @staticmethod
    async def _combined(started: Sequence[Started[ForwardBackwardOutput]]) -> ForwardBackwardOutput:
        return combine_outputs(await asyncio.gather(*(s.outcome for s in started)))

    async def _chunked(
        self,
        path: Literal["forward", "forward_backward"],
        data: Sequence[Datum],
        loss_fn: LossFnType,
        loss_fn_config: dict[str, float] | None = None,
        reference: bool = False,
    ) -> APIFuture[ForwardBackwardOutput]:
        """``reference`` (a ReferenceClient's forward): the run's base model, without what the run trained."""
        check_data(data)
        chunks = chunk_data(data)
        needs = _wire.loss_features(loss_fn, loss_fn_config) + (("reference_forward",) if reference else ())
        first = await self._orders.reserve(len(chunks), needs, path)
        bodies = self._chunk_bodies(path, chunks, loss_fn, loss_fn_config, reference)
        combined = await self._orders.submit(
            first, path, bodies, ForwardBackwardOutput, _KINDS[path], combine_outputs
        )
        return APIFuture(asyncio.get_running_loop(), combined)

    # ----------------------------------------------------------------------------------------- training

    @on_client_loop
    async def forward_async(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnType = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """A forward pass without gradients: per-datum ``logprobs`` (and ``elementwise_loss``) and metrics.

        Large batches go as several ordered requests (128 datums / 500 000 numbers each); the results are
        combined into one ForwardBackwardOutput. ``loss_fn_config`` (upstream Tinker) sets the loss's
        constants, e.g. ``{"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}`` for ppo and cispo,
        ``{"beta": 0.05}`` for dro; it and the losses beyond hpcai's three need the local server (features
        ``loss_fn_config``, ``loss:<name>``: UnsupportedFeatureError before anything is sent otherwise).
        """
        return await self._chunked("forward", data, loss_fn, loss_fn_config)

    forward = submit(forward_async)

    @on_client_loop
    async def forward_backward_async(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnType = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """A forward and backward pass; gradients add up on the server until the next ``optim_step``.

        Large batches go as several ordered requests (128 datums / 500 000 numbers each); the results are
        combined into one ForwardBackwardOutput. ``loss_fn_config``: as for ``forward_async``.
        """
        return await self._chunked("forward_backward", data, loss_fn, loss_fn_config)

    forward_backward = submit(forward_backward_async)

    @on_client_loop
    async def forward_backward_custom_async(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        """forward_backward with a loss computed in torch: ``loss_fn(data, logprobs) -> (loss, metrics)``.

        A forward pass gives each datum's target ``logprobs``; ``loss_fn`` gets them as leaf tensors, its loss
        is back-propagated to them, and a cross-entropy forward_backward with ``weights = -d loss / d
        logprobs`` puts exactly that gradient on the model. The result is the second pass's output (its
        ``loss`` metric is that surrogate's) with ``loss_fn``'s metrics added. The sequence ids of both passes
        are taken at call time, so nothing called later can run between them.
        """
        data = list(data)
        check_data(data)
        chunks = chunk_data(data, custom_count)
        first = self._orders.seq.reserve(2 * len(chunks))
        forward = self._start_chunks(first, "forward", chunks, "cross_entropy")
        forward_result = self._transport.spawn(self._combined(forward))
        result = self._transport.spawn(
            self._custom_backward(forward_result, data, chunks, first + len(chunks), loss_fn)
        )
        await self._orders.submitted(forward)
        return APIFuture(asyncio.get_running_loop(), result)

    forward_backward_custom = submit(forward_backward_custom_async)

    async def _custom_backward(
        self,
        forward: asyncio.Task[ForwardBackwardOutput],
        data: list[Datum],
        chunks: list[list[Datum]],
        first: int,
        loss_fn: CustomLossFn,
    ) -> ForwardBackwardOutput:
        try:
            outputs = await forward
            linear, metrics = linearize(data, outputs, loss_fn)
        except BaseException:
            self._orders.abandon(first, len(chunks))
            raise
        # the same chunk boundaries as the forward pass, so the reserved ids fit
        backward_chunks, at = [], 0
        for chunk in chunks:
            backward_chunks.append(linear[at : at + len(chunk)])
            at += len(chunk)
        started = self._start_chunks(first, "forward_backward", backward_chunks, "cross_entropy")
        result = await self._combined(started)
        result.metrics.update(metrics)
        return result

    @on_client_loop
    async def optim_step_async(
        self,
        adam_params: AdamParams,
        grad_accumulation_normalization: GradAccNormalization | str | None = None,
    ) -> APIFuture[OptimStepResponse]:
        """Apply the gradients accumulated since the last step with AdamW (``adam_params``).

        ``grad_accumulation_normalization`` (Fireworks; ``GradAccNormalization`` or its value) divides the
        gradient summed over the forward_backward calls since the last step first: ``"num_loss_tokens"``
        by their loss tokens (non-zero weights, or advantages for the policy losses), ``"num_sequences"`` by
        their datums with a loss token. ``None`` or ``"none"`` sends the plain sum, as the official SDK does
        (Fireworks' own default is ``"num_loss_tokens"``); the others need the local server's feature
        ``grad_acc_normalization``. A non-zero ``adam_params.weight_decay`` / ``grad_clip_norm`` needs the
        feature of that name.
        """
        mode = GradAccNormalization(grad_accumulation_normalization or "none")
        # weight_decay and grad_clip_norm (Tinker's; hpcai's AdamParams has neither) are sent where the server
        # lists them; 0 is the official step, so it is left out, not refused
        extras = {f: getattr(adam_params, f) for f in ("weight_decay", "grad_clip_norm")}
        unset = {f: msgspec.UNSET for f, value in extras.items() if value == 0}
        if unset:
            adam_params = msgspec.structs.replace(adam_params, **unset)
        needs = tuple(f for f, value in extras.items() if f not in unset and value is not msgspec.UNSET)
        body = OptimStepRequest(adam_params=adam_params, model_id=self.model_id)
        if mode is not GradAccNormalization.NONE:
            body.grad_accumulation_normalization = mode
            needs += ("grad_acc_normalization",)
        return await self._orders.op("optim_step", body, OptimStepResponse, "OptimStep", needs)

    optim_step = submit(optim_step_async)

    # ----------------------------------------------------------------------------------------- weights
    # save_state, load_state*, save_weights_for_sampler, list_checkpoints, resolve_checkpoint_path and the
    # sampling clients come from CheckpointMethods (_checkpointing.py)

    def get_telemetry(self) -> None:
        """The official SDK's telemetry handle; this client sends no telemetry, so it is always None."""
        return None

    # ----------------------------------------------------------------------------------------- model

    @on_client_loop
    async def get_info_async(self) -> GetInfoResponse:
        """The run's model: id, base model name, LoRA rank (in order with the training requests)."""
        n = self._orders.seq.reserve(1)
        return await self._orders.send(n, "get_info", ModelIdRequest(model_id=self.model_id), GetInfoResponse)

    get_info = blocking(get_info_async)

    @on_client_loop
    async def get_tokenizer_async(self) -> PreTrainedTokenizerBase:
        """The Hugging Face tokenizer of the run's model (loaded once per client; needs ``transformers``).

        The model is the client's ``base_model`` when it knows it, else the one ``get_info`` names. The
        plain ``get_tokenizer()`` also works from ``async def`` code on the client's own loop: it then loads
        the tokenizer in the calling thread, without the loop (see "Sync and async" in ``_loop``).
        """
        task = self._tokenizer
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._tokenizer = asyncio.get_running_loop().create_task(self._load_tokenizer())
        return await asyncio.shield(task)

    def _tokenizer_without_loop(self) -> PreTrainedTokenizerBase:
        """``get_tokenizer()`` on the client's own loop thread: the cached tokenizer, or a load right here."""
        task = self._tokenizer
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        if not self.base_model:
            raise RuntimeError(
                "get_tokenizer() was called on the event loop this client runs on, and this client does not "
                "know its base model (it attached to a run by id): use `await get_tokenizer_async()`"
            )
        tokenizer = load_tokenizer(self.base_model)
        done = asyncio.get_running_loop().create_future()
        done.set_result(tokenizer)
        self._tokenizer = done  # a done future serves as the task would
        return tokenizer

    get_tokenizer = blocking(get_tokenizer_async, without_loop=_tokenizer_without_loop)

    async def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        # unordered, as the official client does: the tokenizer need not wait for queued training requests
        name = self.base_model
        if not name:
            body = ModelIdRequest(model_id=self.model_id)
            info = await self._transport.request("POST", "get_info", GetInfoResponse, body=body)
            name = info.model_data.model_name or info.model_name
        if not name:
            raise APIError(f"get_info for {self.model_id} named no model, so there is no tokenizer to load")
        return await asyncio.to_thread(load_tokenizer, name)

    @on_client_loop
    async def unload_model_async(self) -> APIFuture[UnloadModelResponse]:
        """End this run on the server and free its resources (checkpoints stay)."""
        return await self._orders.op(
            "unload_model", ModelIdRequest(model_id=self.model_id), UnloadModelResponse, "UnloadModel"
        )

    async def _unload_acknowledged(self) -> None:
        """Send unload_model and return once the server has queued it, not once it ran (the run of a
        restore that timed out goes after its still running load)."""
        body = ModelIdRequest(model_id=self.model_id)
        await self._orders.acknowledged("unload_model", body, UnloadModelResponse, "UnloadModel")

    # On the client's own loop the plain form is scheduled there (the cookbook calls it from __exit__ inside
    # async code): it runs after everything called before it, and nothing after an unload can matter.
    _unload_model = submit(unload_model_async, unordered_after=True)

    def unload_model(self) -> APIFuture[UnloadModelResponse]:
        # Called inside async code on the client's own loop with nothing of this client outstanding (the
        # cookbook's ``unload_model().result()`` in ``__exit__``), the unload is done now, through a
        # transport of its own on a helper loop, so that ``.result()`` completes as with the official SDK.
        # Otherwise the scheduled form above keeps the order of what is still under way.
        loop = self._binding.loop
        if loop is not None and on_own_thread(loop) and self._orders.seq.idle:
            # the helper's request takes this client's next place in the run's sequence: keep it taken
            # (unless the sequence's start is still to be read from the server, which will count it)
            n = self._orders.seq.reserve() if self._orders.first_seq_id is not None else None
            done: concurrent.futures.Future[UnloadModelResponse] = concurrent.futures.Future()
            try:
                done.set_result(_unload_detached(self))
            except Exception as exc:
                done.set_exception(exc)
            finally:
                if n is not None:
                    self._orders.seq.abandon(n)
            return APIFuture(loop, done)
        return self._unload_model()

    mark_sync_form(unload_model_async, unload_model)  # its name, signature and docstring, as submit gives


def _unload_detached(tc: TrainingClient) -> UnloadModelResponse:
    """Unload ``tc``'s run through a new transport on a helper loop, blocking this thread until it is done.

    The helper client attaches to the run (it goes on from get_info's ``next_seq_id``), so it is only used
    when ``tc`` has nothing outstanding that could still arrive behind it."""
    transport = tc._transport.detached()
    helper = LoopThread("hpcai-async-unload")

    async def unload() -> UnloadModelResponse:
        try:
            attached = TrainingClient(transport, tc.model_id, tc.base_model, first_seq_id=None)
            return await (await attached.unload_model_async())
        finally:
            await transport.aclose()

    try:
        return helper.run(unload())
    finally:
        helper.stop()
