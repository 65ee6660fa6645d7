"""Restoring a run from a checkpoint: a new run of the checkpoint's layout, loaded from it, and nothing left
behind when the load fails or its deadline passes (Tinkex: the temporary client is killed)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING

from ._create import FULL_PARAM_LAYOUT
from ._deadline import Deadline
from ._errors import APIError
from ._futures import APIFuture
from .training import TrainingClient
from .types import LoadWeightsResponse, LoraConfig, TrainingRun

if TYPE_CHECKING:
    from .service import ServiceClient

__all__ = ("restore",)


async def restore(
    service: ServiceClient, path: str, *, optimizer: bool, deadline: Deadline
) -> TrainingClient:
    """A new run shaped like the checkpoint's, loaded from it; unloaded again if the load fails or the
    deadline passes (Tinkex: the temporary client is killed, nothing leaks)."""
    run = await deadline.bound(service.create_rest_client().get_training_run_by_checkpoint_path_async(path))
    if run.is_lora and run.lora_rank is None:
        raise APIError(
            f"training run {run.training_run_id} names no LoRA rank; cannot recreate it from {path}"
        )
    creating = service._transport.spawn(_run_like(service, run))
    try:
        client = await deadline.bound(asyncio.shield(creating))
    except BaseException:
        # a run created after all must go too
        creating.add_done_callback(functools.partial(_unload_once_created, service))
        raise
    loaded: APIFuture[LoadWeightsResponse] | None = None
    try:
        load = client.load_state_with_optimizer_async if optimizer else client.load_state_async
        loaded = await deadline.bound(load(path))
        await deadline.bound(loaded.result_async())
    except BaseException:
        # the run exists only for this restore: leave nothing loaded behind, then raise the load's own
        # error (a failure to unload must not hide it). Past the deadline the load may still be running
        # on the server: the unload is queued behind it, and not waited for.
        if loaded is not None:
            loaded.cancel()
        with contextlib.suppress(Exception):
            if deadline.remaining() == 0:
                await client._unload_acknowledged()
            else:
                await (await client.unload_model_async())
        raise
    return client


async def _run_like(service: ServiceClient, run: TrainingRun) -> TrainingClient:
    """A new run with the layout of ``run``: full-parameter (server feature ``full_param``), or LoRA
    (all of the layout from our server, the rank from others)."""
    if not run.is_lora:
        return await service._create(run.base_model, FULL_PARAM_LAYOUT)
    if isinstance(run.lora_config, LoraConfig):  # our server tells the whole layout
        layout = run.lora_config
        return await service.create_lora_training_client_async(
            run.base_model,
            rank=layout.rank,
            seed=layout.seed,
            train_mlp=layout.train_mlp,
            train_attn=layout.train_attn,
            train_unembed=layout.train_unembed,
        )
    assert run.lora_rank is not None
    return await service.create_lora_training_client_async(run.base_model, rank=run.lora_rank)


def _unload_once_created(service: ServiceClient, creating: asyncio.Task[TrainingClient]) -> None:
    """Done callback of a restore's run creation that was given up: unload the run if it was made."""
    if creating.cancelled() or creating.exception() is not None:
        return
    with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is left to send it
        unload = service._transport.spawn(creating.result()._unload_acknowledged())
        unload.add_done_callback(lambda task: task.cancelled() or task.exception())
