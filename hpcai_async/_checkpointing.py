"""The TrainingClient's checkpoint methods: save and load (ordered with the training requests), the
Fireworks helpers that find this run's checkpoints by name, and sampling clients for saved weights.

* ``save_state(name, ttl_seconds=None)`` / ``save_weights_for_sampler(name, ttl_seconds=None)``: with
  ``ttl_seconds`` (Fireworks, Tinker; server feature ``"ttl"``) the server deletes the checkpoint that many
  seconds after saving it; without it the request is the official one.
* ``load_state(path)`` / ``load_state_with_optimizer(path)``: ``path`` is an ``hpcai://`` or ``tinker://``
  path, or a bare checkpoint name of this run (``"step-4"``, Fireworks' form), resolved to its path first.
  ``timeout=`` (Tinkex's ``await_timeout``) bounds the whole load: the future then raises
  ``APITimeoutError`` (a ``TimeoutError``) if it has not finished by then. Unbounded by default.
* ``list_checkpoints()`` and ``resolve_checkpoint_path(name, source_job_id=None)`` return values (Fireworks'
  helpers are not futures), read from the REST listing.
* ``save_weights_for_sampler_ext(name, checkpoint_type=None, ttl_seconds=None)`` (Fireworks) saves sampler
  weights under ``name`` suffixed with this ServiceClient's session tag, so two processes saving
  ``"step-100"`` do not collide, and returns a ``SaveSamplerResult`` (a value). ``checkpoint_type`` (server
  feature ``"checkpoint_type"``): ``"base"`` full weights that serve on their own (a LoRA run's adapter
  merged into the base weights), ``"delta"`` the LoRA adapter; None: the run's own kind.

A load takes its place in the run's sequence when it is called, before a name is resolved, so call order
stays execution order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec

from . import _wire
from ._deadline import Deadline
from ._errors import ConfigurationError, NotFoundError
from ._futures import APIFuture
from ._loop import LoopBinding, blocking, on_client_loop, submit
from ._retry import RetryConfig
from .concurrency import ConcurrencyController
from .rest import RestClient
from .sampling import SamplingClient
from .types import (
    Checkpoint,
    LoadWeightsRequest,
    LoadWeightsResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsRequest,
    SaveWeightsResponse,
)

if TYPE_CHECKING:
    from ._http import Transport
    from ._ordered import RunRequests

__all__ = ("CheckpointMethods", "SaveSamplerResult")

_TTL_FEATURE = "ttl"
_TYPE_FEATURE = "checkpoint_type"
_SESSION_TAG = 8  # hex digits of the transport's session id that suffix a save_weights_for_sampler_ext name


class SaveSamplerResult(msgspec.Struct, frozen=True):
    """What ``save_weights_for_sampler_ext`` saved: ``path``, the checkpoint's ``hpcai://`` path (sample from
    it with ``create_sampling_client(model_path=path)``), and ``snapshot_name``, the session-qualified name
    it was saved under (``"step-100-1a2b3c4d"``; the path ends with
    ``sampler_weights/<snapshot_name>_sampler``, the server's checkpoint id)."""

    path: str
    snapshot_name: str


class CheckpointMethods:
    """Mixed into ``TrainingClient``: what it does with checkpoints (see the module docstring)."""

    model_id: str
    base_model: str | None
    _transport: Transport
    _orders: RunRequests

    @property
    def _binding(self) -> LoopBinding:
        return self._transport.binding

    def _save_body(
        self,
        name: str,
        ttl_seconds: int | None,
        checkpoint_type: str | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> tuple[SaveWeightsRequest, tuple[str, ...]]:
        """The save request, and the server features its extension fields (sent only when given) need."""
        body = SaveWeightsRequest(model_id=self.model_id, path=name)
        needs: tuple[str, ...] = ()
        if ttl_seconds is not None:
            body.ttl_seconds = ttl_seconds
            needs += (_TTL_FEATURE,)
        if user_metadata is not None:
            body.user_metadata = dict(user_metadata)
            needs += ("user_metadata",)
        if checkpoint_type is not None:
            body.checkpoint_type = checkpoint_type
            needs += (_TYPE_FEATURE,)
        return body, needs

    # ----------------------------------------------------------------------------------------- saves

    @on_client_loop
    async def save_state_async(
        self, name: str, ttl_seconds: int | None = None, *, user_metadata: Mapping[str, str] | None = None
    ) -> APIFuture[SaveWeightsResponse]:
        """Save the training state (weights and optimizer) as checkpoint ``name``; the result has its path.

        ``ttl_seconds`` (1 s to ten years): the server deletes the checkpoint that long after saving it
        (feature ``"ttl"`` of the local server: ``UnsupportedFeatureError`` before anything is sent
        elsewhere). None keeps it until it is deleted. ``user_metadata`` (upstream Tinker's; str to str) is
        kept with the checkpoint and shown in its listing (feature ``"user_metadata"``).
        """
        body, needs = self._save_body(name, ttl_seconds, user_metadata=user_metadata)
        return await self._orders.op("save_weights", body, SaveWeightsResponse, "SaveWeights", needs)

    save_state = submit(save_state_async)

    @on_client_loop
    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None, *, user_metadata: Mapping[str, str] | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save sampler weights as checkpoint ``name``; sample from the returned path.

        ``ttl_seconds``, ``user_metadata``: as for ``save_state_async``.
        """
        body, needs = self._save_body(name, ttl_seconds, user_metadata=user_metadata)
        return await self._orders.op(
            "save_weights_for_sampler", body, SaveWeightsForSamplerResponse, "SaveWeightsForSampler", needs
        )

    save_weights_for_sampler = submit(save_weights_for_sampler_async)

    @on_client_loop
    async def save_weights_for_sampler_ext_async(
        self, name: str, checkpoint_type: str | None = None, ttl_seconds: int | None = None
    ) -> SaveSamplerResult:
        """Save sampler weights as ``name`` suffixed with this ServiceClient's session tag (``step-100`` ->
        ``step-100-1a2b3c4d``), wait for them and return their path and that ``snapshot_name``.

        ``checkpoint_type`` (feature ``"checkpoint_type"``): ``"base"`` full weights that serve on their own
        (a LoRA run's adapter merged into a copy of the base weights; a full-parameter run's weights),
        ``"delta"`` a LoRA run's adapter (a 400 on a full-parameter run); None: the run's own kind, sent as
        a plain save. ``ttl_seconds``: as for ``save_state_async``. A feature the server does not advertise
        raises ``UnsupportedFeatureError`` before anything is sent.
        """
        snapshot = f"{name}-{self._transport.session_id.replace('-', '')[:_SESSION_TAG]}"
        body, needs = self._save_body(snapshot, ttl_seconds, checkpoint_type)
        saving = await self._orders.op(
            "save_weights_for_sampler", body, SaveWeightsForSamplerResponse, "SaveWeightsForSampler", needs
        )
        saved = await saving
        return SaveSamplerResult(path=saved.path, snapshot_name=snapshot)

    save_weights_for_sampler_ext = blocking(save_weights_for_sampler_ext_async)

    # ----------------------------------------------------------------------------------------- loads

    @on_client_loop
    async def load_state_async(
        self,
        path: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the whole load's bound (Tinkex's await_timeout)
    ) -> APIFuture[LoadWeightsResponse]:
        """Load the weights of checkpoint ``path`` into this run.

        ``path``: ``hpcai://...`` / ``tinker://...``, or the name of a checkpoint of this run (resolved with
        ``resolve_checkpoint_path``). The optimizer state is left out where the server lets the client
        choose (it lists ``load_optimizer``); otherwise the server decides, as with the official client.
        ``timeout``: seconds the whole load may take (None: no bound); past it, the future raises
        ``APITimeoutError`` (the load, once sent, still runs on the server).
        """
        return await self._load(path, False, Deadline(timeout, f"load_state({path!r:.200})"))

    load_state = submit(load_state_async)

    @on_client_loop
    async def load_state_with_optimizer_async(
        self,
        path: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the whole load's bound (Tinkex's await_timeout)
    ) -> APIFuture[LoadWeightsResponse]:
        """Load checkpoint ``path`` with its optimizer state, to resume training where it stopped.

        ``path`` and ``timeout``: as for ``load_state_async``.
        """
        return await self._load(path, True, Deadline(timeout, f"load_state_with_optimizer({path!r:.200})"))

    load_state_with_optimizer = submit(load_state_with_optimizer_async)

    async def _load(self, path: str, optimizer: bool, deadline: Deadline) -> APIFuture[LoadWeightsResponse]:
        n = await self._orders.reserve(1, (), "load_weights")  # its place in the sequence: now
        try:
            if _wire.is_checkpoint_name(path):
                path = await deadline.bound(self.resolve_checkpoint_path_async(path))
        except BaseException:
            self._orders.abandon(n, 1)
            raise
        body = LoadWeightsRequest(model_id=self.model_id, path=_wire.wire_path(path), optimizer=optimizer)
        started = self._orders.start(n, "load_weights", body, LoadWeightsResponse, "LoadWeights")
        try:
            await deadline.bound(self._orders.submitted([started]))
        except BaseException:
            started.outcome.cancel()  # nobody will wait for it (the request itself stays sent)
            raise
        outcome = started.outcome
        if deadline.bounded:
            outcome = self._transport.spawn(deadline.bound(started.outcome))
        return APIFuture(asyncio.get_running_loop(), outcome)

    # ----------------------------------------------------------------------------------------- by name

    async def _training_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The run's training-state checkpoints, oldest first (the order they were saved in)."""
        listed = await RestClient(self._transport).list_checkpoints_async(run_id)
        ckpts = [c for c in listed.checkpoints if c.checkpoint_type == "training"]
        return sorted(ckpts, key=lambda c: c.time)  # stable: equal times keep the server's order

    @on_client_loop
    async def list_checkpoints_async(self) -> list[str]:
        """The names of this run's training-state checkpoints (``save_state``), oldest first, e.g.
        ``["step-2", "step-4"]`` (Fireworks' helper; a value, not a future). Sampler weights are not
        listed; ``RestClient.list_checkpoints`` lists everything, with paths and times."""
        ckpts = await self._training_checkpoints(self.model_id)
        return [_wire.checkpoint_name(c.checkpoint_id, "training") for c in ckpts]

    list_checkpoints = blocking(list_checkpoints_async)

    @on_client_loop
    async def resolve_checkpoint_path_async(self, name: str, source_job_id: str | None = None) -> str:
        """The full path of training-state checkpoint ``name`` of this run, or of run ``source_job_id``
        (to resume from another run); ``NotFoundError`` naming the run's checkpoints if it has none of
        that name. ``name`` is what ``save_state`` was given (its checkpoint id, ``name_training``, too)."""
        if not _wire.is_checkpoint_name(name):
            raise ConfigurationError(
                f"name: {name!r:.200} is already a path, not a checkpoint name; load_state takes it as it is"
            )
        run_id = source_job_id or self.model_id
        ckpts = await self._training_checkpoints(run_id)
        for ckpt in reversed(ckpts):  # the newest of that name, should the server hold two
            if name in (ckpt.checkpoint_id, _wire.checkpoint_name(ckpt.checkpoint_id, "training")):
                return ckpt.checkpoint_path
        have = ", ".join(_wire.checkpoint_name(c.checkpoint_id, "training") for c in ckpts)
        raise NotFoundError(
            f"run {run_id} has no training-state checkpoint named {name!r:.200}; "
            + (f"it has {have}"[:400] if have else "it has none (save one with save_state)")
        )

    resolve_checkpoint_path = blocking(resolve_checkpoint_path_async)

    # ----------------------------------------------------------------------------------------- sampling

    @on_client_loop
    async def save_weights_and_get_sampling_client_async(
        self,
        name: str,
        retry_config: RetryConfig | None = None,
        *,
        concurrency_controller: ConcurrencyController | None = None,
    ) -> SamplingClient:
        """Save sampler weights as ``name``, wait for them, and return a SamplingClient for them."""
        saved = await (await self.save_weights_for_sampler_async(name))
        return self.create_sampling_client(
            saved.path, retry_config, concurrency_controller=concurrency_controller
        )

    save_weights_and_get_sampling_client = blocking(save_weights_and_get_sampling_client_async)

    def create_sampling_client(
        self,
        model_path: str,
        retry_config: RetryConfig | None = None,
        *,
        concurrency_controller: ConcurrencyController | None = None,
    ) -> SamplingClient:
        """A SamplingClient for weights saved by this run (``hpcai://...``); ``retry_config``: its retries;
        ``concurrency_controller``: how many of its samples are in flight at once."""
        return SamplingClient(
            self._transport,
            model_path=model_path,
            base_model=self.base_model,
            retry_config=retry_config,
            concurrency_controller=concurrency_controller,
        )

    async def create_sampling_client_async(
        self,
        model_path: str,
        retry_config: RetryConfig | None = None,
        *,
        concurrency_controller: ConcurrencyController | None = None,
    ) -> SamplingClient:
        """Same as ``create_sampling_client`` (nothing to wait for)."""
        return self.create_sampling_client(
            model_path, retry_config, concurrency_controller=concurrency_controller
        )
