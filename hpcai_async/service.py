"""ServiceClient: configuration, the shared session, and the factory of training, sampling, REST clients.

Over 400 lines: it is the public entry point, and most of it is the plain and ``_async`` forms of each factory
with their docstrings; what the factories do is in ``_create``, ``_restore`` and ``_setup``, the options'
checks in ``_config``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from ._config import make_transport
from ._create import attach_only, create_for_pair, create_run
from ._deadline import Deadline
from ._errors import ConfigurationError
from ._futures import QueueStateObserver
from ._http import REQUEST_READ_TIMEOUT
from ._loop import LoopBinding, blocking, on_client_loop
from ._poll import POLL_READ_TIMEOUT
from ._restore import restore
from ._retry import DEFAULT_RETRY_TIMEOUT, RetryConfig
from ._setup import Cleanup, check_cleanup, release, set_up
from .concurrency import ConcurrencyController
from .deployment import DeploymentSampler
from .reference import ReferenceClient
from .rest import RestClient
from .sampling import SamplingClient
from .training import TrainingClient
from .types import (
    AdamParams,
    GetServerCapabilitiesResponse,
    LoraConfig,
)

__all__ = ("ServiceClient",)


class ServiceClient(QueueStateObserver):
    """The entry point: creates training, sampling and REST clients that share one keep-alive session.

    ``base_url`` and ``api_key`` default to ``HPCAI_BASE_URL`` and ``HPCAI_API_KEY`` (an argument wins over
    the environment; the URL defaults to the hosted service). ``connection_limit`` caps the open connections;
    ``retry_timeout`` (300 s) is the retry budget: how long one operation may go on failing without progress
    before ``RetryBudgetExceededError``; ``max_retries`` (default: no cap) also caps the failed attempts in a
    row; ``request_timeout`` (60 s; the official ``timeout=``) is the wait for any single read of a
    request, ``poll_timeout`` (45 s) that of a ``retrieve_future`` long-poll. ``default_headers`` and
    ``default_query`` go with every request. The official ``http_client`` (an httpx client) is refused, and
    ``_strict_response_validation`` is accepted and has no effect (answers are always validated). Use it as
    ``with`` / ``async with``, or call ``close()`` / ``aclose()``; ``cleanup_on_close`` (``"keep"``, the
    official behaviour: runs outlive the client; ``"unload"``, ``"delete"``) says what closing releases of
    the runs this client created (see ``_setup``).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, str | int] | None = None,
        http_client: object | None = None,
        connection_limit: int = 100,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        request_timeout: float = REQUEST_READ_TIMEOUT,
        poll_timeout: float = POLL_READ_TIMEOUT,
        _strict_response_validation: bool = True,
        cleanup_on_close: Cleanup = "keep",
    ) -> None:
        self._transport = make_transport(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
            default_query=default_query,
            http_client=http_client,
            connection_limit=connection_limit,
            retry_timeout=retry_timeout,
            request_timeout=request_timeout,
            poll_timeout=poll_timeout,
        )

        # training clients by (base_model, lora_rank): those create_training_client made (one per pair,
        # as Fireworks allows), and the policy a reference client of that pair shares a run with
        self._claimed: set[tuple[str, int]] = set()
        self._policies: dict[tuple[str, int], TrainingClient] = {}
        # what close() releases (see _setup), and the run from_config set up, until create_training_client
        # hands it out
        self._cleanup = check_cleanup(cleanup_on_close)
        self._owned: list[TrainingClient] = []
        self._configured: dict[tuple[str, int], TrainingClient] = {}
        self.training_client: TrainingClient | None = None

    @property
    def _binding(self) -> LoopBinding:
        return self._transport.binding

    @property
    def base_url(self) -> str:
        return self._transport.base_url

    def __repr__(self) -> str:
        return f"ServiceClient(base_url={self.base_url!r})"

    # ----------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop all polling and close the session (of every client this ServiceClient created)."""
        loop = self._binding.loop
        if loop is None or loop.is_closed():
            self._transport.closed = True
            return
        if loop is asyncio.get_running_loop():
            await self._shutdown()
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._shutdown(), loop))

    def close(self) -> None:
        """Blocking ``aclose``; on the client's own loop use ``await aclose()``."""
        loop = self._binding.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            self._transport.closed = True
            return
        try:
            on_own_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_own_loop = False
        if on_own_loop:
            raise RuntimeError(
                "ServiceClient.close() blocks, but it was called on the client's own event loop: "
                "use `await client.aclose()` (or `async with`)"
            )
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result()

    async def _shutdown(self) -> None:
        """Release what ``cleanup_on_close`` says (once), then close the session."""
        owned, self._owned = self._owned, []
        try:
            if not self._transport.closed:
                await release(self, owned, self._cleanup)
        finally:
            await self._transport.aclose()

    # ----------------------------------------------------------------------------------------- set-up

    @classmethod
    def from_config(
        cls,
        base_model: str,
        *,
        lora_rank: int = 32,
        learning_rate: float = 1e-4,
        model_id: str | None = None,
        cleanup_on_close: Cleanup = "unload",
        **options: Any,
    ) -> ServiceClient:
        """A ServiceClient with its training run ready: a new run of ``base_model`` (``lora_rank`` 0:
        full-parameter), or, with ``model_id``, the existing run it reconnects to after a restart (checked to
        be of that model and rank; it continues the run's sequence). ``service.training_client`` is the run's
        client (``create_training_client(base_model=..., lora_rank=...)`` returns it too, once), and
        ``service.adam_params`` carries ``learning_rate``. ``cleanup_on_close`` (``"unload"``, ``"delete"``,
        ``"keep"``; see ``_setup``) says what ``close()`` releases. ``options`` go to ``ServiceClient()``.
        """
        service = cls(cleanup_on_close=cleanup_on_close, **options)
        try:
            service._set_up(base_model, lora_rank, learning_rate, model_id)
        except BaseException:
            service.close()
            raise
        return service

    @classmethod
    async def from_config_async(
        cls,
        base_model: str,
        *,
        lora_rank: int = 32,
        learning_rate: float = 1e-4,
        model_id: str | None = None,
        cleanup_on_close: Cleanup = "unload",
        **options: Any,
    ) -> ServiceClient:
        """Same as ``from_config``, as a coroutine (the client then runs on the caller's loop)."""
        service = cls(cleanup_on_close=cleanup_on_close, **options)
        try:
            await service._set_up_async(base_model, lora_rank, learning_rate, model_id)
        except BaseException:
            await service.aclose()
            raise
        return service

    @on_client_loop
    async def _set_up_async(
        self, base_model: str, lora_rank: int, learning_rate: float, model_id: str | None
    ) -> None:
        self.adam_params = AdamParams(learning_rate=learning_rate)
        client = await set_up(self, base_model, lora_rank, model_id)
        self._configured[base_model, lora_rank] = self.training_client = client

    _set_up = blocking(_set_up_async)

    # ----------------------------------------------------------------------------------------- service

    @on_client_loop
    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        """The models the service offers (and the protocol extensions it speaks); fetched once, cached."""
        return await self._transport.capabilities()

    get_server_capabilities = blocking(get_server_capabilities_async)

    # ----------------------------------------------------------------------------------------- training

    @on_client_loop
    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = False,
        train_attn: bool = True,
        train_unembed: bool = False,
        *,
        user_metadata: Mapping[str, str] | None = None,
    ) -> TrainingClient:
        """Start a LoRA training run on ``base_model`` and return its TrainingClient.

        The defaults are the official SDK's method defaults (attention layers only), so a ported script
        trains the same adapters; ``types.LoraConfig``'s own field defaults differ (``train_mlp=True``).
        ``user_metadata`` (upstream Tinker's; str to str) is kept with the run and shown in the run listing;
        it needs the server feature ``user_metadata`` (the hosted service would refuse the field).
        """
        if not (train_mlp or train_attn or train_unembed):
            raise ConfigurationError("at least one of train_mlp, train_attn or train_unembed must be True")
        if rank == 0:
            raise ConfigurationError(
                "rank=0 is not a LoRA rank; for full-parameter training use "
                "create_training_client(base_model=..., lora_rank=0)"
            )
        lora = LoraConfig(
            rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed
        )
        client = await self._create(base_model, lora, user_metadata)
        self._policies.setdefault((base_model, rank), client)
        return client

    create_lora_training_client = blocking(create_lora_training_client_async)

    async def _create(
        self, base_model: str, lora: LoraConfig | None, user_metadata: Mapping[str, str] | None = None
    ) -> TrainingClient:
        client = await create_run(self._transport, base_model, lora, user_metadata, self._observe_queue_state)
        if self._cleanup != "keep":
            self._owned.append(client)
        return client

    def create_training_client(
        self,
        model_id: str | None = None,
        base_model: str | None = None,
        *,
        lora_rank: int | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> TrainingClient:
        """The TrainingClient of the existing run ``model_id`` (hpcai's spelling; ``attach_training_client``),
        or, with ``lora_rank`` (Fireworks' spelling), a new run on ``base_model``.

        ``lora_rank=0`` trains every weight (full-parameter, server feature ``full_param``); a rank above 0
        is a LoRA run with ``create_lora_training_client``'s defaults. One such run per (base_model,
        lora_rank) on a ServiceClient: a second raises ValueError (``ConfigurationError``), as with
        Fireworks (``create_lora_training_client`` makes as many as asked). ``user_metadata``: as there.
        """
        if lora_rank is None:
            attach_only(model_id, user_metadata)
            return self.attach_training_client(model_id or "", base_model)
        return self._create_training_client(
            model_id, base_model, lora_rank=lora_rank, user_metadata=user_metadata
        )

    @on_client_loop
    async def create_training_client_async(
        self,
        model_id: str | None = None,
        base_model: str | None = None,
        *,
        lora_rank: int | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> TrainingClient:
        """Same as ``create_training_client``, as a coroutine: it waits for the new run when it makes one."""
        if lora_rank is None:
            attach_only(model_id, user_metadata)
            return self.attach_training_client(model_id or "", base_model)
        return await create_for_pair(self, model_id, base_model, lora_rank, user_metadata)

    _create_training_client = blocking(create_training_client_async)

    def attach_training_client(self, model_id: str, base_model: str | None = None) -> TrainingClient:
        """A TrainingClient for an existing run ``model_id`` (no request is sent now).

        It continues the run's request sequence where it is (the server's ``next_seq_id``, read before its
        first request), so it never replays what another client of the run sent.
        """
        if not model_id:
            raise ConfigurationError(
                "attaching needs the model_id of an existing run; start a new run with "
                "create_lora_training_client(base_model, rank=...) or "
                "create_training_client(base_model=..., lora_rank=...)"
            )
        return TrainingClient(self._transport, model_id, base_model, first_seq_id=None)

    @on_client_loop
    async def create_reference_client_async(self, base_model: str, lora_rank: int = 0) -> ReferenceClient:
        """A forward-only client of ``base_model`` as it is, for reference logprobs (Fireworks' method).

        For a LoRA policy -- a training client of this (base_model, lora_rank) made on this ServiceClient --
        it shares the policy's run with the adapter off, in turn with the policy's requests, and no second
        copy of the base model is made; otherwise (a full-parameter policy, or none) it gets a frozen model
        of its own, which the server refuses to train. Needs the server feature ``reference_forward``.
        """
        await self._transport.require("reference_forward", "create_reference_client")
        policy = self._policies.get((base_model, lora_rank)) if lora_rank else None
        if policy is not None:
            return ReferenceClient(policy, policy=policy)
        return ReferenceClient(await self._create(base_model, None))

    create_reference_client = blocking(create_reference_client_async)

    @on_client_loop
    async def create_training_client_from_state_async(
        self,
        path: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the whole restore's bound (Tinkex's await_timeout)
    ) -> TrainingClient:
        """A new run with the weights of checkpoint ``path`` (``hpcai://...``); a fresh optimizer.

        ``timeout``: seconds the whole restore may take (None: no bound); past it ``APITimeoutError`` (a
        ``TimeoutError``) is raised and the new run is unloaded, as it is when the load fails.
        """
        what = f"create_training_client_from_state({path!r:.200})"
        return await restore(self, path, optimizer=False, deadline=Deadline(timeout, what))

    create_training_client_from_state = blocking(create_training_client_from_state_async)

    @on_client_loop
    async def create_training_client_from_state_with_optimizer_async(
        self,
        path: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the whole restore's bound (Tinkex's await_timeout)
    ) -> TrainingClient:
        """A new run resumed from checkpoint ``path``: weights and optimizer state (``timeout``: as for
        ``create_training_client_from_state_async``)."""
        what = f"create_training_client_from_state_with_optimizer({path!r:.200})"
        return await restore(self, path, optimizer=True, deadline=Deadline(timeout, what))

    create_training_client_from_state_with_optimizer = blocking(
        create_training_client_from_state_with_optimizer_async
    )

    # ----------------------------------------------------------------------------------------- others

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: RetryConfig | None = None,
        *,
        concurrency_controller: ConcurrencyController | None = None,
    ) -> SamplingClient:
        """A SamplingClient for saved weights (``model_path``, ``hpcai://...``) or a ``base_model``.

        ``retry_config`` sets its retries (see ``RetryConfig``); ``concurrency_controller`` (a
        ``FixedConcurrencyController`` or ``AdaptiveConcurrencyController``, shareable) how many of its
        samples are in flight at once.
        """
        return SamplingClient(
            self._transport,
            model_path=model_path,
            base_model=base_model,
            retry_config=retry_config,
            concurrency_controller=concurrency_controller,
        )

    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: RetryConfig | None = None,
        *,
        concurrency_controller: ConcurrencyController | None = None,
    ) -> SamplingClient:
        """Same as ``create_sampling_client`` (nothing to wait for)."""
        return self.create_sampling_client(
            model_path, base_model, retry_config, concurrency_controller=concurrency_controller
        )

    def create_deployment_sampler(
        self,
        model_path: str | None = None,
        *,
        base_model: str | None = None,
        tokenizer: Any = None,
        concurrency_controller: ConcurrencyController | None = None,
    ) -> DeploymentSampler:
        """A DeploymentSampler (Fireworks' shape) for saved weights ``model_path`` or a ``base_model``.

        Its ``sample_with_tokens(messages=..., n=...)`` applies ``tokenizer``'s chat template (None: the
        tokenizer of ``base_model``, loaded on first use) and fans the samples out as concurrent requests
        through ``concurrency_controller``. Nothing is sent now; a new ``model_path`` is a new sampler.
        """
        client = self.create_sampling_client(
            model_path, base_model, concurrency_controller=concurrency_controller
        )
        return DeploymentSampler(client, tokenizer, base_model=base_model)

    def get_telemetry(self) -> None:
        """The official SDK's telemetry handle; this client sends no telemetry, so it is always None."""
        return None

    def create_rest_client(self) -> RestClient:
        """A RestClient for runs and checkpoints, on this client's session."""
        return RestClient(self._transport)
