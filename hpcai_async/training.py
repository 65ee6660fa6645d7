"""TrainingClient: ordered, pipelined training requests; chunked forward passes; custom losses; tokenizers.

Ordering. Every training request takes its sequence number ``n`` (from 0, per TrainingClient) when its
coroutine starts, before its first ``await``, so call order is execution order. ``n`` is in the idempotency
key ``{session}:{client}:{n}`` (PROTOCOL.md §4.1). Where the server lists ``"seq_id"`` in its capabilities,
the request also carries ``seq_id = n + 1`` and is sent at once, concurrently with the others, and the server
restores the order (§4.2). Otherwise request ``n`` is sent as soon as request ``n - 1`` has been acknowledged
(its POST answered), never waiting for a previous *result*: a ``forward_backward`` and the ``optim_step``
after it are both queued on the server before either finishes.

``fut = await tc.forward_backward_async(...)`` returns an ``APIFuture`` once the request is on its way (in
turn mode: once its POST was answered; in seq_id mode: at once), and its polling has started; ``await fut``
gives the result. A request that was called is always sent: cancelling its future only stops the wait for the
result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeAlias, TypeVar

import msgspec

from ._errors import APIError, ConfigurationError
from ._futures import APIFuture
from ._http import Transport
from ._loop import LoopBinding, blocking, on_client_loop, submit
from ._tokenizer import load_tokenizer
from .sampling import SamplingClient
from .types import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    ForwardBackwardRequest,
    ForwardRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    LoadWeightsResponse,
    LossFnType,
    ModelIdRequest,
    OptimStepRequest,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsRequest,
    SaveWeightsResponse,
    TensorData,
    UnloadModelResponse,
    UntypedAPIFuture,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = (
    "MAX_CHUNK_LEN",
    "MAX_CHUNK_NUMBER_COUNT",
    "CustomLossFn",
    "TrainingClient",
    "chunk_data",
    "combine_metrics",
    "combine_outputs",
)

T = TypeVar("T")

# Chunking of forward / forward_backward, the official client's constants (PROTOCOL.md §8.1).
MAX_CHUNK_LEN = 128  # datums per request
MAX_CHUNK_NUMBER_COUNT = 500_000  # numbers (tokens + tensor values) per request

CustomLossFn: TypeAlias = Callable[
    [list[Datum], list["torch.Tensor"]], tuple["torch.Tensor", Mapping[str, float]]
]

# The extension flag that makes load_weights restore (or not) the optimizer state (PROTOCOL.md §8.7).
_OPTIMIZER_FEATURE = "load_optimizer"

_Body: TypeAlias = (
    ForwardRequest
    | ForwardBackwardRequest
    | OptimStepRequest
    | ModelIdRequest
    | SaveWeightsRequest
    | LoadWeightsRequest
)


# --------------------------------------------------------------------------------------------- chunks


def chunk_data(data: Sequence[Datum], count: Callable[[Datum], int] | None = None) -> list[list[Datum]]:
    """Split ``data`` into requests of at most 128 datums and 500 000 numbers (a bigger datum goes alone)."""
    count = count or _num_numbers
    chunks: list[list[Datum]] = []
    current: list[Datum] = []
    numbers = 0
    for datum in data:
        n = count(datum)
        if current and (numbers + n > MAX_CHUNK_NUMBER_COUNT or len(current) == MAX_CHUNK_LEN):
            chunks.append(current)
            current, numbers = [], 0
        current.append(datum)
        numbers += n
    if current:
        chunks.append(current)
    return chunks


def _num_numbers(datum: Datum) -> int:
    return datum.num_numbers


def _custom_count(datum: Datum) -> int:
    # forward_backward_custom sends each datum twice: as given, then with target_tokens and weights only.
    # Chunk by the larger of the two so both passes can use the same chunks (and the ids reserved for them).
    target = datum.loss_fn_inputs.get("target_tokens")
    second = datum.model_input.length + 2 * (target.size if target is not None else datum.model_input.length)
    return max(datum.num_numbers, second)


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    if total <= 0:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


def combine_metrics(metrics: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """Combine the metrics of chunk results (PROTOCOL.md §8.2).

    Only keys of the first chunk that every chunk has are kept; each is reduced by the suffix after its ``:``:
    ``mean`` (weighted by ``weights``, the datums per chunk), ``sum``, ``min``, ``max``, ``slack`` (max minus
    the weighted mean), ``unique`` (the first value under the key, later ones as ``key_1``, ``key_2`` ...) and
    ``hash_unordered``. Unknown reductions are dropped; keys without exactly one ``:`` keep the first chunk's
    value.
    """
    if not metrics:
        return {}
    first = metrics[0]
    out: dict[str, float] = {}
    for key, value in first.items():
        if not all(key in m for m in metrics[1:]):
            continue
        if key.count(":") != 1:
            out[key] = value
            continue
        values = [m[key] for m in metrics]
        match key.split(":")[1]:
            case "mean":
                out[key] = _weighted_mean(values, weights)
            case "sum":
                out[key] = float(sum(values))
            case "min":
                out[key] = min(values)
            case "max":
                out[key] = max(values)
            case "slack":
                out[key] = max(values) - _weighted_mean(values, weights)
            case "unique":
                out[key] = values[0]
                out.update({f"{key}_{i}": v for i, v in enumerate(values[1:], start=1)})
            case "hash_unordered":
                # the official client's order-insensitive hash of the (integer) per-chunk hashes
                out[key] = hash(tuple(sorted(int(v) for v in values)))
    return out


def combine_outputs(results: Sequence[ForwardBackwardOutput]) -> ForwardBackwardOutput:
    """One ForwardBackwardOutput from the results of the chunks of one call, in chunk order."""
    if not results:
        return ForwardBackwardOutput(loss_fn_output_type="", loss_fn_outputs=[], metrics={})
    return ForwardBackwardOutput(
        loss_fn_output_type=results[0].loss_fn_output_type,
        loss_fn_outputs=[out for r in results for out in r.loss_fn_outputs],
        metrics=combine_metrics([r.metrics for r in results], [len(r.loss_fn_outputs) for r in results]),
    )


# --------------------------------------------------------------------------------------------- the client


class TrainingClient:
    """A LoRA training run on the service: forward/backward passes, optimizer steps, checkpoints.

    Get one from ``ServiceClient.create_lora_training_client`` (or ``create_training_client_from_state``).
    Every operation is a coroutine ``x_async`` and a plain ``x``; training operations return an ``APIFuture``.
    """

    def __init__(self, transport: Transport, model_id: str, base_model: str | None = None) -> None:
        self._transport = transport
        self.model_id = model_id
        self.base_model = base_model
        self._index = transport.training_client_index()
        self._next = 0  # the next sequence number to hand out
        self._turn = 0  # turn mode: the sequence number whose POST may go now
        self._ended: set[int] = set()  # turn mode: numbers whose turn ended before it came
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._tokenizer: asyncio.Future[PreTrainedTokenizerBase] | None = None

    @property
    def _binding(self) -> LoopBinding:
        return self._transport.binding

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self.base_model!r})"

    # ----------------------------------------------------------------------------------------- ordering

    def _reserve(self, count: int) -> int:
        """Take ``count`` consecutive sequence numbers (synchronously, so call order is wire order)."""
        first = self._next
        self._next += count
        return first

    def _key(self, n: int) -> str:
        return f"{self._transport.session_id}:{self._index}:{n}"

    async def _wait_turn(self, n: int) -> None:
        while self._turn < n:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[n] = waiter
            try:
                await waiter
            finally:
                self._waiters.pop(n, None)

    def _end_turn(self, n: int) -> None:
        """Request ``n`` was sent (or will never be): let the next one go."""
        if n < self._turn:
            return
        self._ended.add(n)
        while self._turn in self._ended:
            self._ended.discard(self._turn)
            self._turn += 1
        waiter = self._waiters.get(self._turn)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _abandon(self, first: int, count: int) -> None:
        """Reserved numbers whose requests will never be sent (a custom loss failed between its passes).

        Turn-taking just skips them. A seq_id server waits for every id in order, so each hole is filled with
        a ``get_info`` carrying that seq_id: a no-op that takes the turn, and later requests run at once.
        """
        if not self._transport.seq_mode:
            for n in range(first, first + count):
                self._end_turn(n)
            return
        for n in range(first, first + count):
            filler = self._transport.spawn(
                self._send(n, "get_info", ModelIdRequest(model_id=self.model_id), GetInfoResponse)
            )
            filler.add_done_callback(_ignore_outcome)

    async def _send(self, n: int, path: str, body: _Body, result: type[T]) -> T:
        """POST request ``n``: with its seq_id at once, or on its turn."""
        try:
            features = await self._transport.features()
        except BaseException:
            self._end_turn(n)
            raise
        if isinstance(body, LoadWeightsRequest) and _OPTIMIZER_FEATURE not in features:
            body.optimizer = msgspec.UNSET  # the official protocol has no such field
        headers = self._transport.submit_headers if result is UntypedAPIFuture else None
        if "seq_id" in features:
            body.seq_id = n + 1
            return await self._transport.request(
                "POST", path, result, body=body, key=self._key(n), headers=headers, batch=True
            )
        try:
            await self._wait_turn(n)
            return await self._transport.request(
                "POST", path, result, body=body, key=self._key(n), headers=headers
            )
        finally:
            self._end_turn(n)

    def _start(self, n: int, path: str, body: _Body, result: type[T], request_type: str) -> _Started[T]:
        """Start sending request ``n`` and, once it is acknowledged, polling for its result."""
        submission = self._transport.spawn(self._send(n, path, body, UntypedAPIFuture), name=f"{path} #{n}")
        outcome = self._transport.spawn(self._outcome(submission, result, request_type, time.monotonic()))
        return _Started(submission, outcome)

    async def _outcome(
        self, submission: asyncio.Task[UntypedAPIFuture], result: type[T], request_type: str, started: float
    ) -> T:
        future = await asyncio.shield(submission)  # cancelling the result never cancels the submission
        return await self._transport.poll(
            future.request_id,
            result,
            request_type=request_type,
            model_id=future.model_id or self.model_id,
            roundtrip=time.monotonic() - started,
            inline=future.result,
        )

    async def _submitted(self, started: Sequence[_Started[Any]]) -> None:
        """Turn mode: wait until these POSTs were answered. seq_id mode: they are on their way already."""
        if started and not self._transport.seq_mode:
            await asyncio.wait([s.submission for s in started])

    async def _op(self, path: str, body: _Body, result: type[T], request_type: str) -> APIFuture[T]:
        started = self._start(self._reserve(1), path, body, result, request_type)
        await self._submitted([started])
        return APIFuture(asyncio.get_running_loop(), started.outcome)

    def _start_chunks(
        self,
        first: int,
        path: Literal["forward", "forward_backward"],
        chunks: list[list[Datum]],
        loss_fn: LossFnType,
    ) -> list[_Started[ForwardBackwardOutput]]:
        started = []
        for i, chunk in enumerate(chunks):
            body: _Body
            fb_input = ForwardBackwardInput(data=chunk, loss_fn=loss_fn)
            if path == "forward":
                body = ForwardRequest(forward_input=fb_input, model_id=self.model_id)
                started.append(self._start(first + i, path, body, ForwardBackwardOutput, "Forward"))
            else:
                body = ForwardBackwardRequest(forward_backward_input=fb_input, model_id=self.model_id)
                started.append(self._start(first + i, path, body, ForwardBackwardOutput, "ForwardBackward"))
        return started

    @staticmethod
    async def _combined(started: Sequence[_Started[ForwardBackwardOutput]]) -> ForwardBackwardOutput:
        return combine_outputs(await asyncio.gather(*(s.outcome for s in started)))

    async def _chunked(
        self, path: Literal["forward", "forward_backward"], data: Sequence[Datum], loss_fn: LossFnType
    ) -> APIFuture[ForwardBackwardOutput]:
        chunks = chunk_data(data)
        started = self._start_chunks(self._reserve(len(chunks)), path, chunks, loss_fn)
        combined = self._transport.spawn(self._combined(started))
        await self._submitted(started)
        return APIFuture(asyncio.get_running_loop(), combined)

    # ----------------------------------------------------------------------------------------- training

    @on_client_loop
    async def forward_async(
        self, data: Sequence[Datum], loss_fn: LossFnType = "cross_entropy"
    ) -> APIFuture[ForwardBackwardOutput]:
        """A forward pass without gradients: per-datum ``logprobs`` (and ``elementwise_loss``) and metrics.

        Large batches go as several ordered requests (128 datums / 500 000 numbers each); the results are
        combined into one ForwardBackwardOutput.
        """
        return await self._chunked("forward", data, loss_fn)

    forward = submit(forward_async)

    @on_client_loop
    async def forward_backward_async(
        self, data: Sequence[Datum], loss_fn: LossFnType = "cross_entropy"
    ) -> APIFuture[ForwardBackwardOutput]:
        """A forward and backward pass; gradients add up on the server until the next ``optim_step``.

        Large batches go as several ordered requests (128 datums / 500 000 numbers each); the results are
        combined into one ForwardBackwardOutput.
        """
        return await self._chunked("forward_backward", data, loss_fn)

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
        chunks = chunk_data(data, _custom_count)
        first = self._reserve(2 * len(chunks))
        forward = self._start_chunks(first, "forward", chunks, "cross_entropy")
        forward_result = self._transport.spawn(self._combined(forward))
        result = self._transport.spawn(
            self._custom_backward(forward_result, data, chunks, first + len(chunks), loss_fn)
        )
        await self._submitted(forward)
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
            linear, metrics = _linearize(data, outputs, loss_fn)
        except BaseException:
            self._abandon(first, len(chunks))
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
    async def optim_step_async(self, adam_params: AdamParams) -> APIFuture[OptimStepResponse]:
        """Apply the gradients accumulated since the last step with AdamW (``adam_params``)."""
        body = OptimStepRequest(adam_params=adam_params, model_id=self.model_id)
        return await self._op("optim_step", body, OptimStepResponse, "OptimStep")

    optim_step = submit(optim_step_async)

    # ----------------------------------------------------------------------------------------- weights

    @on_client_loop
    async def save_state_async(self, name: str) -> APIFuture[SaveWeightsResponse]:
        """Save the training state (weights and optimizer) as checkpoint ``name``; the result has its path."""
        body = SaveWeightsRequest(model_id=self.model_id, path=name)
        return await self._op("save_weights", body, SaveWeightsResponse, "SaveWeights")

    save_state = submit(save_state_async)

    @on_client_loop
    async def load_state_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load the weights of checkpoint ``path`` (``hpcai://...``) into this run.

        The optimizer state is left out where the server lets the client choose (it lists ``load_optimizer``
        in its capabilities); otherwise the server decides, as with the official client.
        """
        body = LoadWeightsRequest(model_id=self.model_id, path=path, optimizer=False)
        return await self._op("load_weights", body, LoadWeightsResponse, "LoadWeights")

    load_state = submit(load_state_async)

    @on_client_loop
    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load checkpoint ``path`` with its optimizer state, to resume training where it stopped."""
        body = LoadWeightsRequest(model_id=self.model_id, path=path, optimizer=True)
        return await self._op("load_weights", body, LoadWeightsResponse, "LoadWeights")

    load_state_with_optimizer = submit(load_state_with_optimizer_async)

    @on_client_loop
    async def save_weights_for_sampler_async(self, name: str) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save sampler weights as checkpoint ``name``; sample from the returned path."""
        body = SaveWeightsRequest(model_id=self.model_id, path=name)
        return await self._op(
            "save_weights_for_sampler", body, SaveWeightsForSamplerResponse, "SaveWeightsForSampler"
        )

    save_weights_for_sampler = submit(save_weights_for_sampler_async)

    @on_client_loop
    async def save_weights_and_get_sampling_client_async(self, name: str) -> SamplingClient:
        """Save sampler weights as ``name``, wait for them, and return a SamplingClient for them."""
        saved = await (await self.save_weights_for_sampler_async(name))
        return SamplingClient(self._transport, model_path=saved.path, base_model=self.base_model)

    save_weights_and_get_sampling_client = blocking(save_weights_and_get_sampling_client_async)

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        """A SamplingClient for weights saved by this run (``hpcai://...``)."""
        return SamplingClient(self._transport, model_path=model_path, base_model=self.base_model)

    async def create_sampling_client_async(self, model_path: str) -> SamplingClient:
        """Same as ``create_sampling_client`` (nothing to wait for)."""
        return self.create_sampling_client(model_path)

    # ----------------------------------------------------------------------------------------- model

    @on_client_loop
    async def get_info_async(self) -> GetInfoResponse:
        """The run's model: id, base model name, LoRA rank (in order with the training requests)."""
        n = self._reserve(1)
        return await self._send(n, "get_info", ModelIdRequest(model_id=self.model_id), GetInfoResponse)

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
        return await self._op(
            "unload_model", ModelIdRequest(model_id=self.model_id), UnloadModelResponse, "UnloadModel"
        )

    # On the client's own loop the plain form is scheduled there (the cookbook calls it from __exit__ inside
    # async code): it runs after everything called before it, and nothing after an unload can matter.
    unload_model = submit(unload_model_async, unordered_after=True)


class _Started(Generic[T]):
    """A request under way: the task sending it and the task waiting for its result."""

    __slots__ = ("outcome", "submission")

    def __init__(self, submission: asyncio.Task[UntypedAPIFuture], outcome: asyncio.Task[T]) -> None:
        self.submission = submission
        self.outcome = outcome


def _linearize(
    data: list[Datum], forward: ForwardBackwardOutput, loss_fn: CustomLossFn
) -> tuple[list[Datum], dict[str, float]]:
    """Turn a custom loss into cross-entropy weights: ``w = -d loss / d logprobs`` (PROTOCOL.md §8.3)."""
    import torch

    if len(forward.loss_fn_outputs) != len(data):
        raise APIError(
            f"the forward pass returned {len(forward.loss_fn_outputs)} outputs for {len(data)} datums"
        )
    logprobs = [
        torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32, requires_grad=True)
        for out in forward.loss_fn_outputs
    ]
    loss, metrics = loss_fn(data, logprobs)
    loss.backward()
    linear = []
    for datum, lp in zip(data, logprobs, strict=True):
        if "target_tokens" not in datum.loss_fn_inputs:
            raise ConfigurationError(
                "forward_backward_custom needs loss_fn_inputs['target_tokens'] in every datum"
            )
        grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)  # a datum the loss does not use
        weights = TensorData.from_numpy((-grad).detach().numpy().astype("float32"))
        linear.append(
            Datum(
                model_input=datum.model_input,
                loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"], "weights": weights},
            )
        )
    return linear, {key: float(_detached(value)) for key, value in metrics.items()}


def _ignore_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed filler changes nothing for the caller


def _detached(value: Any) -> Any:
    detach = getattr(value, "detach", None)  # a torch tensor metric: no autograd warning on float()
    return detach() if callable(detach) else value
