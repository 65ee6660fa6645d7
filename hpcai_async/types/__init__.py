"""Every wire struct of the HPC-AI protocol, shared by the client and the local server (PROTOCOL.md §5-§7).

Structs mirror the official SDK's models field for field, so ``print(result)`` reads like the reference
output. Fields that exist only in our protocol extensions (``seq_id``, ``weight_decay``, ...) default to
``UNSET`` and are never sent unless set. Tensor payloads (``TensorData.data``, ``EncodedTextChunk.tokens``)
are carried as a list, a numpy array or raw little-endian bytes (``.raw``; ``_tensor`` turns any of them into
numpy without per-element Python work), and always *read* as a list of Python numbers, as in the official
SDK. The official SDK's ``hpcai.types.<submodule>`` paths exist too (``_paths``).
"""

from __future__ import annotations

import enum
from typing import Any, Literal, TypeAlias

import msgspec
from msgspec import UNSET, Struct, UnsetType

from .._tensor import TensorDtype
from ._tensors import (
    Datum,
    EncodedTextChunk,
    ImageAssetPointerChunk,
    LossFnInputs,
    LossFnOutput,
    ModelInput,
    ModelInputChunk,
    TensorData,
)

__all__ = (
    "AdamParams",
    "Checkpoint",
    "CheckpointType",
    "CheckpointsListResponse",
    "ComputeLogprobsResponse",
    "CreateModelRequest",
    "CreateModelResponse",
    "Cursor",
    "Datum",
    "EncodedTextChunk",
    "ErrorResponse",
    "ForwardBackwardInput",
    "ForwardBackwardOutput",
    "ForwardBackwardRequest",
    "ForwardRequest",
    "FutureRetrieveRequest",
    "GetInfoRequest",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "GradAccNormalization",
    "HealthResponse",
    "ImageAssetPointerChunk",
    "LoadWeightsRequest",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "ModelData",
    "ModelID",
    "ModelIdRequest",
    "ModelInput",
    "ModelInputChunk",
    "OptimStepRequest",
    "OptimStepResponse",
    "ParsedCheckpointPath",
    "RequestID",
    "SampleRequest",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsRequest",
    "SaveWeightsResponse",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TensorDtype",
    "TrainingRun",
    "TrainingRunsResponse",
    "TryAgainResponse",
    "UnloadModelRequest",
    "UnloadModelResponse",
    "UntypedAPIFuture",
)
# Not listed: BatchItem, BatchRequest, BatchAnswer, BatchResponse -- the structs of our "batch" protocol
# extension, used by the client's transport and the local server, not by programs.

# hpcai's three, then upstream Tinker's cispo and dro (local server only: feature "loss:<name>")
LossFnType: TypeAlias = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]
StopReason: TypeAlias = Literal["length", "stop"]
CheckpointType: TypeAlias = Literal["training", "sampler"]
ModelID: TypeAlias = str  # the official SDK's names for the ids
RequestID: TypeAlias = str


# ---------------------------------------------------------------------------------------- parameters


class LoraConfig(Struct, kw_only=True):
    rank: int
    seed: int | None = None
    train_unembed: bool = False
    train_mlp: bool = True
    train_attn: bool = True


class AdamParams(Struct, kw_only=True):
    """AdamW hyper-parameters. ``weight_decay`` and ``grad_clip_norm`` are sent only when set."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float | UnsetType = UNSET
    grad_clip_norm: float | UnsetType = UNSET


class GradAccNormalization(enum.StrEnum):
    """optim_step's ``grad_accumulation_normalization`` (Fireworks training SDK): what the gradient summed
    over the forward_backward calls since the last step is divided by. ``NONE`` (the plain sum) is the
    official SDK's behaviour and our default; the others need the server feature
    ``grad_acc_normalization``."""

    NUM_LOSS_TOKENS = "num_loss_tokens"  # the loss tokens (non-zero weights / advantages) of those calls
    NUM_SEQUENCES = "num_sequences"  # their datums that have at least one loss token
    NONE = "none"


class SamplingParams(Struct, kw_only=True):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None  # msgspec cannot decode a union of two list types
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


# ---------------------------------------------------------------------------------------- requests


class ForwardBackwardInput(Struct, kw_only=True):
    data: list[Datum]
    loss_fn: LossFnType
    loss_fn_config: dict[str, float] | UnsetType = UNSET  # upstream Tinker; feature "loss_fn_config"


class ForwardRequest(Struct, kw_only=True):
    forward_input: ForwardBackwardInput
    model_id: str
    seq_id: int | UnsetType = UNSET
    # "reference_forward": True computes the run's base model without what the run trained (LoRA adapters
    # off), in turn with the run's other requests; sent only when True
    reference: bool | UnsetType = UNSET


class ForwardBackwardRequest(Struct, kw_only=True):
    forward_backward_input: ForwardBackwardInput
    model_id: str
    seq_id: int | UnsetType = UNSET


class OptimStepRequest(Struct, kw_only=True):
    adam_params: AdamParams
    model_id: str
    seq_id: int | UnsetType = UNSET
    grad_accumulation_normalization: GradAccNormalization | UnsetType = UNSET  # "grad_acc_normalization"


class ModelIdRequest(Struct, kw_only=True):
    """Body of get_info and unload_model."""

    model_id: str
    seq_id: int | UnsetType = UNSET


GetInfoRequest = ModelIdRequest
UnloadModelRequest = ModelIdRequest


class SaveWeightsRequest(Struct, kw_only=True):
    """Body of save_weights and save_weights_for_sampler (``path`` is the checkpoint name).

    ``ttl_seconds`` (ours, server feature ``"ttl"``; Tinker and Fireworks have it too): the checkpoint is
    deleted that many seconds after it was saved; sent only when given (never: the checkpoint is kept).
    ``checkpoint_type`` (ours, feature ``"checkpoint_type"``; Fireworks' ``save_weights_for_sampler_ext``),
    for sampler saves: ``"base"`` full weights that serve on their own, ``"delta"`` a LoRA run's adapter;
    sent only when given (the run's own kind: delta for LoRA, base for full-parameter)."""

    model_id: str
    path: str | UnsetType = UNSET
    seq_id: int | UnsetType = UNSET
    ttl_seconds: int | UnsetType = UNSET
    user_metadata: dict[str, str] | UnsetType = UNSET  # upstream Tinker's (feature "user_metadata")
    checkpoint_type: str | UnsetType = UNSET


SaveWeightsForSamplerRequest = SaveWeightsRequest


class LoadWeightsRequest(Struct, kw_only=True):
    model_id: str
    path: str
    optimizer: bool | UnsetType = UNSET
    seq_id: int | UnsetType = UNSET


class CreateModelRequest(Struct, kw_only=True):
    """``lora_config.rank`` 0 asks for full-parameter training (feature "full_param"; its other fields then
    do not apply); ``reference`` for a forward-only model of the base model as it is ("reference_forward",
    no ``lora_config``); ``user_metadata`` is kept with the run ("user_metadata", upstream Tinker's field)."""

    base_model: str
    lora_config: LoraConfig | None = None
    type: Literal["create_model"] = "create_model"
    user_metadata: dict[str, str] | UnsetType = UNSET
    reference: bool | UnsetType = UNSET


class SampleRequest(Struct, kw_only=True):
    prompt: ModelInput
    sampling_params: SamplingParams
    num_samples: int = 1
    base_model: str | UnsetType = UNSET
    model_path: str | UnsetType = UNSET
    prompt_logprobs: bool = False
    # "topk_prompt_logprobs" (tinker's field): the k most likely tokens at each prompt position
    topk_prompt_logprobs: int | UnsetType = UNSET


class FutureRetrieveRequest(Struct, kw_only=True):
    request_id: str
    model_id: str | UnsetType = UNSET


# ---------------------------------------------------------------------------------------- responses


class UntypedAPIFuture(Struct, kw_only=True):
    request_id: str
    model_id: str | None = None
    # Ours ("inline_result"): the job's answer, already encoded as retrieve_future would give it, when it was
    # ready within the wait the client asked for; this saves the retrieve_future round trip.
    result: msgspec.Raw | UnsetType = UNSET


# Ours ("batch"): many requests in one POST /api/v1/batch. Each body is exactly what the request would send on
# its own (in the batch's format), and each answer exactly what it would get: the same dedupe, ordering and
# errors, one HTTP round trip instead of one per request.


class BatchItem(Struct, kw_only=True):
    path: str  # the route under /api/v1, e.g. "forward_backward"
    body: msgspec.Raw
    idempotency_key: str | None = None


class BatchRequest(Struct, kw_only=True):
    requests: list[BatchItem]


class BatchAnswer(Struct, kw_only=True):
    status: int
    body: msgspec.Raw
    headers: dict[str, str] | UnsetType = UNSET  # those of its own answer that matter (queue_duration)


class BatchResponse(Struct, kw_only=True):
    responses: list[BatchAnswer]


class TryAgainResponse(Struct, kw_only=True):
    request_id: str
    type: Literal["try_again"] = "try_again"
    queue_state: str | None = None


class ErrorResponse(Struct, kw_only=True):
    error: str
    message: str
    details: dict[str, Any] | None = None
    code: str | None = None  # extension: a machine-readable reason, e.g. "sequence_conflict"


class ForwardBackwardOutput(Struct, kw_only=True):
    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


class OptimStepResponse(Struct, kw_only=True):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(Struct, kw_only=True):
    path: str
    type: Literal["save_weights"] | None = "save_weights"


class SaveWeightsForSamplerResponse(Struct, kw_only=True):
    path: str
    type: Literal["save_weights_for_sampler"] | None = "save_weights_for_sampler"


class LoadWeightsResponse(Struct, kw_only=True):
    path: str | None = None
    type: Literal["load_weights"] | None = "load_weights"


class UnloadModelResponse(Struct, kw_only=True):
    model_id: str
    type: Literal["unload_model"] | None = "unload_model"


class CreateModelResponse(Struct, kw_only=True):
    model_id: str
    type: Literal["create_model"] | None = "create_model"


class ModelData(Struct, kw_only=True):
    arch: str | None = None
    model_name: str | None = None


class GetInfoResponse(Struct, kw_only=True):
    type: Literal["get_info"] | None = "get_info"
    model_data: ModelData
    model_id: str
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None
    next_seq_id: int | None = None  # extension ("seq_id"): the seq_id the model's next request must carry


class SupportedModel(Struct, kw_only=True):
    model_name: str | None = None
    max_context_length: int | None = None


class GetServerCapabilitiesResponse(Struct, kw_only=True):
    supported_models: list[SupportedModel]
    # Protocol extensions the server understands, e.g. "seq_id", "msgpack" (ours; the hosted service: none).
    features: list[str] = []


class HealthResponse(Struct, kw_only=True):
    status: str


class ComputeLogprobsResponse(Struct, kw_only=True):
    logprobs: list[float | None]
    type: Literal["compute_logprobs"] = "compute_logprobs"


class SampledSequence(Struct, kw_only=True):
    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None


class SampleResponse(Struct, kw_only=True):
    sequences: list[SampledSequence]
    type: Literal["sample"] = "sample"
    prompt_logprobs: list[float | None] | None = None
    # with topk_prompt_logprobs=k (tinker's shape): per prompt token, up to k (token id, logprob) pairs,
    # most likely first; entry 0 is None (the first token has no context)
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


from . import _paths  # noqa: E402 - registers the official SDK's module paths, which need the names above
from ._rest import (  # noqa: E402 - they need LoraConfig and CheckpointType from above
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    ParsedCheckpointPath,
    TrainingRun,
    TrainingRunsResponse,
)

_paths.register()
