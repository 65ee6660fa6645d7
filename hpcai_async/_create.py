"""Creating runs: the create_model request for a LoRA, full-parameter or reference model, its feature
checks (nothing is sent to a server that lacks one) and the wait for the new model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from ._errors import ConfigurationError
from ._futures import QueueState
from ._http import Transport
from .training import TrainingClient
from .types import CreateModelRequest, CreateModelResponse, LoraConfig, UntypedAPIFuture

if TYPE_CHECKING:
    from .service import ServiceClient

__all__ = ("FULL_PARAM_LAYOUT", "attach_only", "create_for_pair", "create_model", "create_run")

# create_model's lora_config for full-parameter training (server feature "full_param"): rank 0
FULL_PARAM_LAYOUT: Final = LoraConfig(rank=0)


async def create_run(
    transport: Transport,
    base_model: str,
    lora: LoraConfig | None,
    user_metadata: Mapping[str, str] | None,
    on_queue_state: Callable[[str | QueueState], None],
) -> TrainingClient:
    """A new run and its TrainingClient: LoRA, full-parameter (``lora.rank`` 0: feature ``full_param``) or,
    ``lora`` None, a frozen reference model (``reference_forward``); ``user_metadata`` needs its feature."""
    body = CreateModelRequest(base_model=base_model, lora_config=lora)
    needs = []
    if lora is None:
        body.reference, what = True, "create_reference_client"
        needs.append("reference_forward")
    elif lora.rank == 0:
        needs.append("full_param")
        what = "full-parameter training (lora_rank=0)"
    else:
        what = "create_lora_training_client"
    if user_metadata is not None:
        body.user_metadata = dict(user_metadata)
        needs.append("user_metadata")
    for feature in needs:
        await transport.require(feature, f"{what} with user_metadata" if feature == "user_metadata" else what)
    # the capabilities (needed by the first training call) are fetched while the model is created
    model_id, _ = await asyncio.gather(create_model(transport, body, on_queue_state), transport.features())
    return TrainingClient(transport, model_id, base_model)


async def create_model(
    transport: Transport, body: CreateModelRequest, on_queue_state: Callable[[str | QueueState], None]
) -> str:
    """Send ``body`` and wait for the new model's id."""
    started = time.monotonic()
    await transport.features()  # which extensions the submit may use (fetched once per ServiceClient)
    submitted = await transport.request(
        "POST", "create_model", UntypedAPIFuture, body=body, headers=transport.submit_headers
    )
    created = await transport.poll(
        submitted.request_id,
        CreateModelResponse,
        request_type="CreateModel",
        roundtrip=time.monotonic() - started,
        inline=submitted.result,
        on_queue_state=on_queue_state,
    )
    return created.model_id


def attach_only(model_id: str | None, user_metadata: Mapping[str, str] | None) -> None:
    """create_training_client without lora_rank attaches: it needs a model_id and takes no metadata."""
    if user_metadata is not None:
        raise ConfigurationError(
            "user_metadata is kept when a run is created: pass lora_rank= with base_model= (or use "
            "create_lora_training_client); create_training_client(model_id) attaches to an existing run"
        )
    if not model_id:
        raise ConfigurationError(
            "create_training_client needs the model_id of an existing run, or base_model= and lora_rank= "
            "for a new one (lora_rank=0: full-parameter), or use create_lora_training_client(base_model)"
        )


async def create_for_pair(
    service: ServiceClient,
    model_id: str | None,
    base_model: str | None,
    lora_rank: int,
    user_metadata: Mapping[str, str] | None,
) -> TrainingClient:
    """``create_training_client(base_model=..., lora_rank=...)`` (Fireworks): one run per (base_model,
    lora_rank) on a ServiceClient -- from_config's, handed out once, or a new one -- and a second is
    refused."""
    if model_id is not None or not base_model:
        raise ConfigurationError(
            "create_training_client with lora_rank creates a run: pass base_model= by keyword and no "
            f"model_id (got model_id={model_id!r}, base_model={base_model!r}); attach to an existing run "
            "with attach_training_client(model_id)"
        )
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ConfigurationError(f"lora_rank: 0 (full-parameter) or a LoRA rank >= 1, got {lora_rank!r}")
    key = (base_model, lora_rank)
    if (configured := service._configured.pop(key, None)) is not None:
        return configured  # from_config's run, handed out once
    if key in service._claimed:
        raise ConfigurationError(
            f"this ServiceClient already made a training client for base_model={base_model!r}, "
            f"lora_rank={lora_rank} (one per pair, as Fireworks allows); use that one, or another "
            "ServiceClient for a separate run"
        )
    service._claimed.add(key)  # before the first await: two concurrent calls cannot both pass
    try:
        if lora_rank == 0:
            client = await service._create(base_model, FULL_PARAM_LAYOUT, user_metadata)
        else:
            client = await service.create_lora_training_client_async(
                base_model, rank=lora_rank, user_metadata=user_metadata
            )
    except BaseException:
        service._claimed.discard(key)
        raise
    service._policies[key] = client
    return client
