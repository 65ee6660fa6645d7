"""SamplingClient: text generation and prompt logprobs from a base model or saved weights.

Sampling requests are unordered: each goes out at once (``POST asample`` with ``X-HpcAI-Sampling-Backpressure:
1`` and a ``{session}:unordered:{n}`` idempotency key) and is polled like any future. A 429 answer is
backpressure: it opens a short window, shared by every SamplingClient of the ServiceClient, during which no
sampling request is sent; the request then goes again. A future that expired on the server (410) is sampled
again, within the retry budget, and so is one the server no longer knows (404 after a restart): sampling
has no side effects. One retry budget covers a sample's submits, polls and re-submits.

How many samples are on the wire at once is the concurrency controller's (``concurrency``): a request holds
a slot from its submit to its result; the controller hears of its 429s (from the backpressure handling
above) and of the queue duration the server reports with its result (``"queue_duration"``).

A SamplingClient pickles: unpickled (in another process, say) it connects anew from the same settings (base
URL, API key, timeouts, retry settings, model, a fresh controller of the same kind), never sharing the
original's session. The pickle holds the API key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from . import _wire
from ._errors import APIError, ConfigurationError, GoneError, NotFoundError
from ._futures import QueueStateObserver
from ._http import Transport
from ._loop import LoopBinding, future, on_client_loop
from ._retry import RetryConfig
from .concurrency import ConcurrencyController, FixedConcurrencyController, Slot
from .types import ModelInput, SampleRequest, SampleResponse, SamplingParams, UntypedAPIFuture

__all__ = ("SamplingClient",)

_BACKPRESSURE_HEADERS = {_wire.SAMPLING_BACKPRESSURE: "1"}


class SamplingClient(QueueStateObserver):
    """Generates tokens from ``base_model``, or from LoRA weights at ``model_path`` (``hpcai://...``).

    Get one from ``ServiceClient.create_sampling_client`` or
    ``TrainingClient.save_weights_and_get_sampling_client``. ``retry_config`` (a ``RetryConfig``) sets this
    client's retry budget and backoff; without it the ServiceClient's settings apply.
    ``concurrency_controller`` (``FixedConcurrencyController`` or ``AdaptiveConcurrencyController``, which
    several clients may share) bounds the samples on the wire at once; without one, ``retry_config``'s
    ``max_connections`` does (a fixed controller of that size), and without either there is no bound but
    the connection limit. ``on_queue_state_change`` is called when its samples are throttled or queued
    (see ``QueueStateObserver``).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: RetryConfig | None = None,
        concurrency_controller: ConcurrencyController | None = None,
    ) -> None:
        if model_path is not None and not _wire.is_checkpoint_path(model_path):
            raise ConfigurationError(
                f"model_path must start with 'hpcai://' (or 'tinker://'), got {_wire.shorten(model_path)}"
            )
        if model_path is None and base_model is None:
            raise ConfigurationError("a SamplingClient needs a model_path or a base_model")
        if retry_config is not None and not isinstance(retry_config, RetryConfig):
            raise ConfigurationError(f"retry_config must be a RetryConfig, got {type(retry_config).__name__}")
        if concurrency_controller is not None and not isinstance(
            concurrency_controller, ConcurrencyController
        ):
            raise ConfigurationError(
                "concurrency_controller must be a FixedConcurrencyController or an "
                f"AdaptiveConcurrencyController, got {type(concurrency_controller).__name__}"
            )
        if concurrency_controller is None and retry_config is not None:
            concurrency_controller = FixedConcurrencyController(retry_config.max_connections)
        self._transport = transport
        self._retry = retry_config.policy() if retry_config is not None else transport.retry
        self.retry_config = retry_config
        self.concurrency_controller = concurrency_controller
        self.model_path = model_path
        # what each request sends: the hosted scheme (a tinker:// path as the same hpcai:// one), made once
        self._wire_model_path = _wire.wire_path(model_path) if model_path is not None else msgspec.UNSET
        self.base_model = base_model

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its settings (see the module docstring): unpickled, it connects anew."""
        settings = (self.model_path, self.base_model, self.retry_config, self.concurrency_controller)
        return (_reconnect, (self._transport.settings(), *settings))

    @property
    def _binding(self) -> LoopBinding:
        return self._transport.binding

    def __repr__(self) -> str:
        return f"SamplingClient(model_path={self.model_path!r}, base_model={self.base_model!r})"

    def get_telemetry(self) -> None:
        """The official SDK's telemetry handle; this client sends no telemetry, so it is always None."""
        return None

    @on_client_loop
    async def sample_async(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> SampleResponse:
        """``num_samples`` completions of ``prompt`` (and its logprobs with ``include_prompt_logprobs``).

        ``topk_prompt_logprobs=k`` (tinker's argument; server feature ``"topk_prompt_logprobs"``) also returns
        the k most likely tokens at each prompt position as ``(token_id, logprob)`` pairs, most likely first
        (``response.topk_prompt_logprobs``; entry 0 is None).
        """
        if isinstance(sampling_params.stop, str):
            sampling_params = msgspec.structs.replace(sampling_params, stop=[sampling_params.stop])
        if isinstance(topk_prompt_logprobs, bool) or not isinstance(topk_prompt_logprobs, int):
            raise ConfigurationError(f"topk_prompt_logprobs must be an integer, got {topk_prompt_logprobs!r}")
        if topk_prompt_logprobs:
            await self._transport.require("topk_prompt_logprobs", "sample(topk_prompt_logprobs=...)")
        body = SampleRequest(
            prompt=prompt,
            sampling_params=sampling_params,
            num_samples=num_samples,
            base_model=self.base_model if self.base_model is not None else msgspec.UNSET,
            model_path=self._wire_model_path,
            prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs or msgspec.UNSET,
        )
        controller = self.concurrency_controller
        if controller is None:
            return await self._sample(body, None)
        async with controller.slot() as slot:  # held from the submit to the result
            return await self._sample(body, slot)

    sample = future(sample_async)

    async def _sample(self, body: SampleRequest, slot: Slot | None) -> SampleResponse:
        transport = self._transport
        features = await transport.features()  # the body's encoding depends on them (fetched once)
        queue_signal = slot is not None and "queue_duration" in features
        budget = self._retry.budget("asample")  # one budget: submits, polls and re-submits

        def on_queue_state(state: str) -> None:
            self._observe_queue_state(state)
            if slot is not None and state == "paused_rate_limit":  # a 429: the backpressure in _http
                slot.throttled()

        def on_headers(headers: Mapping[str, str]) -> None:
            if slot is not None and (queued := _wire.queue_duration(headers)) is not None:
                slot.queued(queued)

        while True:
            sent = time.monotonic()
            answer = await transport.call(
                "POST",
                "asample",
                body=body,
                key=transport.unordered_key(),
                headers={**_BACKPRESSURE_HEADERS, **transport.submit_headers},
                backpressure=True,
                batch=True,
                budget=budget,
                on_queue_state=on_queue_state,
            )
            submitted = _wire.decode(answer.payload, answer.content_type, UntypedAPIFuture)
            try:
                return await transport.poll(
                    submitted.request_id,
                    SampleResponse,
                    request_type="Sample",
                    roundtrip=time.monotonic() - sent,
                    inline=submitted.result,
                    inline_headers=answer.headers,
                    budget=budget,
                    on_queue_state=on_queue_state,
                    on_headers=on_headers if queue_signal else None,
                )
            except (GoneError, NotFoundError) as exc:
                # The server no longer knows a future it accepted (a restart: 404; an expiry: 410). Sampling
                # has no side effects, so sample again, from this request's budget.
                await asyncio.sleep(budget.failed(f"retrieve_future: {exc.message}", exc.status))

    @on_client_loop
    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        """The logprob of each prompt token given the ones before it (the first is None)."""
        response = await self.sample_async(
            prompt, 1, SamplingParams(max_tokens=1), include_prompt_logprobs=True
        )
        if response.prompt_logprobs is None:
            raise APIError("the server returned no prompt logprobs")
        return response.prompt_logprobs

    compute_logprobs = future(compute_logprobs_async)


def _reconnect(
    settings: dict[str, Any],
    model_path: str | None,
    base_model: str | None,
    retry_config: RetryConfig | None,
    controller: ConcurrencyController | None,
) -> SamplingClient:
    """A SamplingClient unpickled: its own transport, built from the original's settings."""
    return SamplingClient(
        Transport(**settings),
        model_path=model_path,
        base_model=base_model,
        retry_config=retry_config,
        concurrency_controller=controller,
    )
