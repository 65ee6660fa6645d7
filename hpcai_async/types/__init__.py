"""Every wire struct of the HPC-AI protocol, shared by the client and the local server (PROTOCOL.md §5-§7).

Structs mirror the official SDK's models field for field, so ``print(result)`` reads like the reference
output. Fields that exist only in our protocol extensions (``seq_id``, ``weight_decay``, ...) default to
``UNSET`` and are never sent unless set. Tensor payloads (``TensorData.data``, ``EncodedTextChunk.tokens``)
are carried as a list, a numpy array or raw little-endian bytes (``.raw``; ``_tensor`` turns any of them into
numpy without per-element Python work), and always *read* as a list of Python numbers, as in the official
SDK. The official SDK's ``hpcai.types.<submodule>`` paths exist too (``_paths``).
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import UNSET, Struct, UnsetType

from .. import _tensor, _wire
from .._tensor import TensorDtype

if TYPE_CHECKING:
    import torch

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

# Plain lists in Datum.loss_fn_inputs get their dtype from the key (PROTOCOL.md §5.2).
_KEY_DTYPES: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
}


# ---------------------------------------------------------------------------------------- tensors and inputs


_WIRE_DTYPES = _tensor.DTYPES  # numpy is imported here anyway: look the table up once, not per struct


def _owned(value: Any, dtype: TensorDtype, what: str) -> Any:
    """A payload the struct owns: lists and tuples copied to a list, arrays copied, bytes kept (immutable).

    The caller may reuse its buffer afterwards (``buf.clear()``, ``arr[:] = 0``) without changing the struct,
    as with the official SDK's types, which copy on construction too.
    """
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, np.ndarray):
        if value.dtype == _WIRE_DTYPES.get(dtype):
            return value.copy()
        return _tensor.as_array(value, dtype, what=what)  # a conversion is a copy already
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


def _as_list(raw: Any, dtype: TensorDtype, what: str) -> list[Any]:
    if isinstance(raw, list):
        return raw
    out: list[Any] = _tensor.as_array(raw, dtype, what=what).reshape(-1).tolist()
    return out


def _list_view(cls: type, field: str, dtype: Callable[[Any], TensorDtype]) -> None:
    """Make ``cls.<field>`` read as a list of Python numbers, whatever the payload travelled as.

    msgspec stores the field in a slot and encodes, decodes and compares it from there; only Python-level
    attribute access goes through the class attribute, which becomes this property. A payload that is not a
    list (an array, MessagePack bytes) is converted on first read and the list replaces it, so the list is
    the one source of truth from then on (mutating it changes the tensor, as with the official SDK). The
    fast paths (``to_numpy()``, ``raw``) never build the list.
    """
    slot = cls.__dict__[field]

    def get(self: Any) -> list[Any]:
        raw = slot.__get__(self, cls)
        if type(raw) is list:
            return raw
        value = _as_list(raw, dtype(self), f"{cls.__name__}.{field}")
        slot.__set__(self, value)
        return value

    def set_(self: Any, value: Any) -> None:
        slot.__set__(self, _owned(value, dtype(self), f"{cls.__name__}.{field}"))

    cls._raw_slot = slot  # type: ignore[attr-defined]
    setattr(cls, field, property(get, set_, doc=f"The {field} as a list of Python numbers."))


class TensorData(Struct, kw_only=True, gc=False):
    """A flat tensor: ``data`` row-major, ``dtype`` int64 or float32, optional ``shape`` (None = 1-D).

    ``data`` may be given as a list, a numpy array (or anything array-like) or raw little-endian bytes; the
    struct keeps its own copy (lists and arrays are copied, bytes are immutable), so the caller may reuse its
    buffer. Reading ``.data`` always gives a list of Python numbers, as in the official SDK (built from the
    array on first read); ``to_numpy()`` / ``to_torch()`` are the fast paths, and ``raw`` the payload as
    carried (what MessagePack sends without per-element work).
    """

    data: Any
    dtype: TensorDtype
    shape: list[int] | None = None
    _raw_slot: ClassVar[Any]  # the slot behind ``data`` (see _list_view)

    def __post_init__(self) -> None:
        # Arrays are kept in their wire dtype so MessagePack can send their bytes as they are.
        slot = TensorData._raw_slot
        slot.__set__(self, _owned(slot.__get__(self, TensorData), self.dtype, "TensorData.data"))

    @property
    def raw(self) -> Any:
        """The payload as carried: a list, a numpy array of the wire dtype, or little-endian bytes."""
        return TensorData._raw_slot.__get__(self, TensorData)

    @classmethod
    def from_numpy(cls, array: npt.ArrayLike) -> TensorData:
        arr = np.asarray(array)
        dtype = _tensor.wire_dtype(arr.dtype)
        return cls(data=arr.reshape(-1), dtype=dtype, shape=list(arr.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        return cls.from_numpy(_tensor.from_torch(tensor))

    def to_numpy(self) -> npt.NDArray[Any]:
        """The tensor as a numpy array (no copy when it is carried as one: do not write to it)."""
        return _tensor.as_array(self.raw, self.dtype, self.shape)

    def to_torch(self) -> torch.Tensor:
        return _tensor.to_torch(self.to_numpy())

    def tolist(self) -> list[Any]:
        out: list[Any] = self.to_numpy().tolist()
        return out

    @property
    def size(self) -> int:
        """Number of values (no conversion for arrays and bytes)."""
        data = self.raw
        if isinstance(data, np.ndarray):
            return int(data.size)
        if isinstance(data, bytes):
            return len(data) // _WIRE_DTYPES[self.dtype].itemsize
        return len(data)

    def __repr__(self) -> str:
        data = _as_list(self.raw, self.dtype, "TensorData.data")  # without replacing the payload
        return f"TensorData(data={data!r}, dtype={self.dtype!r}, shape={self.shape!r})"


class EncodedTextChunk(Struct, kw_only=True, tag="encoded_text", tag_field="type", gc=False):
    """Token ids of text: given as a list, an integer array or raw little-endian int64 bytes.

    The chunk keeps its own copy (lists and arrays are copied), so ``EncodedTextChunk(tokens=buf)`` followed
    by ``buf.clear()`` leaves the chunk intact. Reading ``.tokens`` gives a list of ints, as in the official
    SDK; ``to_numpy()`` and ``raw`` avoid building it.
    """

    tokens: Any
    _raw_slot: ClassVar[Any]  # the slot behind ``tokens`` (see _list_view)

    def __post_init__(self) -> None:
        slot = EncodedTextChunk._raw_slot
        slot.__set__(self, _owned(slot.__get__(self, EncodedTextChunk), "int64", "tokens"))

    @property
    def raw(self) -> Any:
        """The token ids as carried: a list, an int64 array, or little-endian int64 bytes."""
        return EncodedTextChunk._raw_slot.__get__(self, EncodedTextChunk)

    @property
    def length(self) -> int:
        tokens = self.raw
        if isinstance(tokens, bytes):
            return len(tokens) // 8
        return len(tokens)

    def to_numpy(self) -> npt.NDArray[np.int64]:
        return _tensor.as_array(self.raw, "int64", what="tokens").reshape(-1)


_list_view(TensorData, "data", lambda td: td.dtype)
_list_view(EncodedTextChunk, "tokens", lambda _chunk: "int64")


class ImageAssetPointerChunk(Struct, kw_only=True, tag="image_asset_pointer", tag_field="type"):
    format: Literal["png", "jpeg"]
    height: int
    location: str
    tokens: int
    width: int

    @property
    def length(self) -> int:
        return self.tokens


ModelInputChunk: TypeAlias = EncodedTextChunk | ImageAssetPointerChunk


class ModelInput(Struct, kw_only=True):
    chunks: list[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: Any) -> ModelInput:
        """A text-only input from token ids (a list or an integer array)."""
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        out: list[int] = self.to_numpy().tolist()
        return out

    def to_numpy(self) -> npt.NDArray[np.int64]:
        """All token ids as one int64 array; raises ValueError if there is a non-text chunk."""
        parts = []
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError(f"to_ints needs text chunks only, got a {type(chunk).__name__}")
            parts.append(chunk.to_numpy())
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))


LossFnInputs: TypeAlias = dict[str, TensorData]
LossFnOutput: TypeAlias = dict[str, TensorData]


class Datum(Struct, kw_only=True):
    """One example: ``model_input`` and the loss function's per-token inputs.

    Values of ``loss_fn_inputs`` may be given as TensorData, numpy arrays, torch tensors or plain lists
    (whose dtype comes from the key: ``target_tokens`` int64; ``weights``, ``advantages``, ``logprobs``
    float32).
    """

    loss_fn_inputs: dict[str, TensorData]
    model_input: ModelInput

    def __post_init__(self) -> None:
        inputs = self.loss_fn_inputs
        for key, value in inputs.items():
            if not isinstance(value, TensorData):
                inputs[key] = _to_tensor_data(key, value)

    @property
    def num_numbers(self) -> int:
        """How many numbers this datum puts on the wire (PROTOCOL.md §8.1 chunking rule)."""
        return self.model_input.length + sum(t.size for t in self.loss_fn_inputs.values())


def _to_tensor_data(key: str, value: Any) -> TensorData:
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if type(value).__module__.startswith("torch"):
        return TensorData.from_torch(value)
    if isinstance(value, list | tuple):
        dtype = _KEY_DTYPES.get(key)
        if dtype is None:
            raise ValueError(
                f"loss_fn_inputs[{key!r}]: cannot infer the dtype of a plain list for this key; "
                "pass a numpy array or TensorData"
            )
        return TensorData(data=value, dtype=dtype, shape=[len(value)])
    raise ValueError(
        f"loss_fn_inputs[{key!r}]: expected TensorData, an array or a list, got {type(value).__name__}"
    )


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
    """Body of save_weights and save_weights_for_sampler (``path`` is the checkpoint name)."""

    model_id: str
    path: str | UnsetType = UNSET
    seq_id: int | UnsetType = UNSET


SaveWeightsForSamplerRequest = SaveWeightsRequest


class LoadWeightsRequest(Struct, kw_only=True):
    model_id: str
    path: str
    optimizer: bool | UnsetType = UNSET
    seq_id: int | UnsetType = UNSET


class CreateModelRequest(Struct, kw_only=True):
    base_model: str
    lora_config: LoraConfig | None = None
    type: Literal["create_model"] = "create_model"


class SampleRequest(Struct, kw_only=True):
    prompt: ModelInput
    sampling_params: SamplingParams
    num_samples: int = 1
    base_model: str | UnsetType = UNSET
    model_path: str | UnsetType = UNSET
    prompt_logprobs: bool = False


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


# ---------------------------------------------------------------------------------------- REST


class Checkpoint(Struct, kw_only=True):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: _dt.datetime
    checkpoint_path: str


class ParsedCheckpointPath(Struct, kw_only=True):
    """A checkpoint path and its parts: ``hpcai://{training_run_id}/{checkpoint_type}/{checkpoint_id}``.

    The official SDK's type; ``parse`` accepts every spelling the client does (``hpcai://`` and
    ``tinker://``, ``weights`` / ``sampler_weights`` as well as ``training`` / ``sampler``) and raises
    ``ConfigurationError`` (a ``ValueError``, as the official parser raises) for anything else.
    """

    checkpoint_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def parse(cls, path: str) -> ParsedCheckpointPath:
        parts = _wire.parse_checkpoint_path(path)
        return cls(
            checkpoint_path=path,
            training_run_id=parts.training_run_id,
            checkpoint_type=parts.checkpoint_type,
            checkpoint_id=parts.checkpoint_id,
        )

    @classmethod
    def from_checkpoint_path(cls, checkpoint_path: str) -> ParsedCheckpointPath:
        return cls.parse(checkpoint_path)

    @classmethod
    def from_hpcai_path(cls, path: str) -> ParsedCheckpointPath:
        return cls.parse(path)

    def to_path(self) -> str:
        return f"{self.training_run_id}/{self.checkpoint_type}/{self.checkpoint_id}"

    def to_uri(self) -> str:
        return f"hpcai://{self.to_path()}"


class CheckpointsListResponse(Struct, kw_only=True):
    checkpoints: list[Checkpoint]


class TrainingRun(Struct, kw_only=True):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: _dt.datetime
    corrupted: bool = False
    lora_rank: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    # Ours: the run's full LoRA layout, so a run recreated from a checkpoint gets the same target modules
    # (the hosted service sends only lora_rank; then the create_lora_training_client defaults apply).
    lora_config: LoraConfig | UnsetType = UNSET


class Cursor(Struct, kw_only=True):
    offset: int
    limit: int
    total_count: int


class TrainingRunsResponse(Struct, kw_only=True):
    training_runs: list[TrainingRun]
    cursor: Cursor


from . import _paths  # noqa: E402 - registers the official SDK's module paths, which need the names above

_paths.register()
