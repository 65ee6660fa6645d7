"""SamplingClient: text generation and prompt logprobs from a base model or saved weights.

Sampling requests are unordered: each goes out at once (``POST asample`` with ``X-HpcAI-Sampling-Backpressure:
1`` and a ``{session}:unordered:{n}`` idempotency key) and is polled like any future. A 429 answer is
backpressure: it opens a short window, shared by every SamplingClient of the ServiceClient, during which no
sampling request is sent; the request then goes again. A future that expired on the server (410) is sampled
again, within the retry budget, and so is one the server no longer knows (404 after a restart): sampling
has no side effects. One retry budget covers a sample's submits, polls and re-submits.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from . import _wire
from ._errors import APIError, ConfigurationError, GoneError, NotFoundError
from ._http import Transport
from ._loop import LoopBinding, future, on_client_loop
from .types import ModelInput, SampleRequest, SampleResponse, SamplingParams, UntypedAPIFuture

__all__ = ("SamplingClient",)

_BACKPRESSURE_HEADERS = {_wire.SAMPLING_BACKPRESSURE: "1"}


class SamplingClient:
    """Generates tokens from ``base_model``, or from LoRA weights at ``model_path`` (``hpcai://...``).

    Get one from ``ServiceClient.create_sampling_client`` or
    ``TrainingClient.save_weights_and_get_sampling_client``.
    """

    def __init__(
        self, transport: Transport, *, model_path: str | None = None, base_model: str | None = None
    ) -> None:
        if model_path is not None and not _wire.is_checkpoint_path(model_path):
            raise ConfigurationError(
                f"model_path must start with 'hpcai://' (or 'tinker://'), got {_wire.shorten(model_path)}"
            )
        if model_path is None and base_model is None:
            raise ConfigurationError("a SamplingClient needs a model_path or a base_model")
        self._transport = transport
        self._retry = transport.retry
        self.model_path = model_path
        self.base_model = base_model

    @property
    def _binding(self) -> LoopBinding:
        return self._transport.binding

    def __repr__(self) -> str:
        return f"SamplingClient(model_path={self.model_path!r}, base_model={self.base_model!r})"

    @on_client_loop
    async def sample_async(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
    ) -> SampleResponse:
        """``num_samples`` completions of ``prompt`` (and its logprobs with ``include_prompt_logprobs``)."""
        if isinstance(sampling_params.stop, str):
            sampling_params = msgspec.structs.replace(sampling_params, stop=[sampling_params.stop])
        body = SampleRequest(
            prompt=prompt,
            sampling_params=sampling_params,
            num_samples=num_samples,
            base_model=self.base_model if self.base_model is not None else msgspec.UNSET,
            model_path=self.model_path if self.model_path is not None else msgspec.UNSET,
            prompt_logprobs=include_prompt_logprobs,
        )
        transport = self._transport
        await transport.features()  # the body's encoding depends on them (fetched once per ServiceClient)
        budget = self._retry.budget("asample")  # one budget: submits, polls and re-submits
        while True:
            sent = time.monotonic()
            submitted = await transport.request(
                "POST",
                "asample",
                UntypedAPIFuture,
                body=body,
                key=transport.unordered_key(),
                headers={**_BACKPRESSURE_HEADERS, **transport.submit_headers},
                backpressure=True,
                batch=True,
                budget=budget,
            )
            try:
                return await transport.poll(
                    submitted.request_id,
                    SampleResponse,
                    request_type="Sample",
                    roundtrip=time.monotonic() - sent,
                    inline=submitted.result,
                    budget=budget,
                )
            except (GoneError, NotFoundError) as exc:
                # The server no longer knows a future it accepted (a restart: 404; an expiry: 410). Sampling
                # has no side effects, so sample again, from this request's budget.
                await asyncio.sleep(budget.failed(f"retrieve_future: {exc.message}", exc.status))

    sample = future(sample_async)

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
