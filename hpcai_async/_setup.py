"""The one-call set-up (in the spirit of Fireworks' ``from_firetitan_config``): a run created, or reconnected
to by its id after the process restarted, and what ``ServiceClient.close()`` releases of it.

``cleanup_on_close``: ``"keep"`` leaves every run as it is (a plain ``ServiceClient``'s default, as with the
official SDK: runs outlive their client); ``"unload"`` unloads, when the ServiceClient closes, the runs it
created (``create_lora_training_client``, ``create_training_client(base_model=..., lora_rank=...)``, reference
models, restores) and the run the set-up reconnected to; ``"delete"`` unloads them and deletes their
checkpoints too. Runs attached to with ``attach_training_client`` are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal, get_args

from ._errors import ConfigurationError, NotFoundError
from .training import TrainingClient

if TYPE_CHECKING:
    from .service import ServiceClient

__all__ = ("CLEANUPS", "Cleanup", "check_cleanup", "release", "set_up")

Cleanup = Literal["unload", "delete", "keep"]
CLEANUPS: Final = get_args(Cleanup)


def check_cleanup(cleanup: str) -> Cleanup:
    if cleanup not in CLEANUPS:
        raise ConfigurationError(f"cleanup_on_close: one of {', '.join(CLEANUPS)}; got {cleanup!r:.200}")
    return cleanup  # type: ignore[return-value]


async def set_up(
    service: ServiceClient, base_model: str, lora_rank: int, model_id: str | None
) -> TrainingClient:
    """from_config's run: a new one, or ``model_id`` reconnected to (and released on close like a new one)."""
    if model_id is None:
        return await service.create_training_client_async(base_model=base_model, lora_rank=lora_rank)
    client = await _reconnect(service, model_id, base_model, lora_rank)
    service._claimed.add((base_model, lora_rank))
    service._policies[base_model, lora_rank] = client
    service._owned.append(client)
    return client


async def _reconnect(
    service: ServiceClient, model_id: str, base_model: str, lora_rank: int
) -> TrainingClient:
    """The TrainingClient of the existing run ``model_id``, once the server confirmed that it is a run of
    ``base_model`` with ``lora_rank`` (0: full-parameter); it continues the run's sequence."""
    client = service.attach_training_client(model_id, base_model)
    info = await client.get_info_async()  # NotFoundError if there is no such run
    name = info.model_data.model_name or info.model_name
    rank = (info.lora_rank or 0) if info.is_lora is not False else 0
    if name != base_model or rank != lora_rank:
        raise ConfigurationError(
            f"run {model_id!r:.200} is a run of {name!r} with lora_rank={rank}, not of {base_model!r:.200} "
            f"with lora_rank={lora_rank}: pass the run's own base_model and lora_rank, or leave out model_id "
            "for a new run"
        )
    return client


async def release(service: ServiceClient, clients: Sequence[TrainingClient], cleanup: Cleanup) -> None:
    """Unload ``clients``' runs (all at once), and with ``"delete"`` delete their checkpoints; a run that is
    gone already counts as released. The first other error is raised once every run was tried."""
    if cleanup == "keep" or not clients:
        return
    outcomes = await asyncio.gather(
        *(_release_one(service, tc, delete=cleanup == "delete") for tc in clients), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def _release_one(service: ServiceClient, tc: TrainingClient, *, delete: bool) -> None:
    with contextlib.suppress(NotFoundError):
        await (await tc.unload_model_async())
    if delete:
        rest = service.create_rest_client()
        listing = await rest.list_checkpoints_async(tc.model_id)
        for checkpoint in listing.checkpoints:
            with contextlib.suppress(NotFoundError):
                await rest.delete_checkpoint_async(tc.model_id, checkpoint.checkpoint_id)
