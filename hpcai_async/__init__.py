"""hpcai_async: an async-first, pipelined client for the HPC-AI fine-tuning API (and an offline local server).

    from hpcai_async import ServiceClient, types

    async with ServiceClient() as service:                      # HPCAI_BASE_URL / HPCAI_API_KEY
        tc = await service.create_lora_training_client_async("Qwen/Qwen3-8B", rank=16)
        fb = await tc.forward_backward_async(batch, "cross_entropy")    # submitted, in call order
        opt = await tc.optim_step_async(types.AdamParams(learning_rate=1e-4))
        print((await fb).metrics, (await opt).metrics)           # both were in flight together

Every operation is a coroutine ``x_async`` and a plain ``x`` (for scripts, threads and notebooks). The names
the official ``hpcai`` package exports at its top level are exported here too (the common types, and
``HpcAIError``, the official spelling of ``HpcaiError``), so ``import hpcai_async as hpcai`` ports a program.
"""

from . import types
from ._checkpointing import SaveSamplerResult
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    GoneError,
    HpcaiError,
    IdempotencyConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    RetryBudgetExceededError,
    SequenceConflictError,
    UnprocessableEntityError,
    UnsupportedFeatureError,
)
from ._futures import APIFuture, QueueState
from ._retry import RetryConfig
from ._version import __version__
from .concurrency import AdaptiveConcurrencyController, ConcurrencyController, FixedConcurrencyController
from .deployment import DeploymentSampler, SampledCompletion
from .reference import ReferenceClient
from .rest import RestClient
from .sampling import SamplingClient
from .service import ServiceClient
from .training import TrainingClient
from .types import (
    AdamParams,
    Checkpoint,
    CheckpointType,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    LoraConfig,
    ModelID,
    ModelInput,
    ModelInputChunk,
    OptimStepRequest,
    OptimStepResponse,
    ParsedCheckpointPath,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    StopReason,
    TensorData,
    TensorDtype,
    TrainingRun,
)

HpcAIError = HpcaiError  # the official SDK's spelling of the root error
__title__ = "hpcai_async"

__all__ = (
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIStatusError",
    "APITimeoutError",
    "AdamParams",
    "AdaptiveConcurrencyController",
    "AuthenticationError",
    "BadRequestError",
    "Checkpoint",
    "CheckpointType",
    "ConcurrencyController",
    "ConfigurationError",
    "ConflictError",
    "Datum",
    "DeploymentSampler",
    "EncodedTextChunk",
    "FixedConcurrencyController",
    "ForwardBackwardOutput",
    "GoneError",
    "HpcAIError",
    "HpcaiError",
    "IdempotencyConflictError",
    "InternalServerError",
    "LoraConfig",
    "ModelID",
    "ModelInput",
    "ModelInputChunk",
    "NotFoundError",
    "OptimStepRequest",
    "OptimStepResponse",
    "ParsedCheckpointPath",
    "PermissionDeniedError",
    "QueueState",
    "RateLimitError",
    "ReferenceClient",
    "RequestFailedError",
    "RestClient",
    "RetryBudgetExceededError",
    "RetryConfig",
    "SampleRequest",
    "SampleResponse",
    "SampledCompletion",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "SaveSamplerResult",
    "SequenceConflictError",
    "ServiceClient",
    "StopReason",
    "TensorData",
    "TensorDtype",
    "TrainingClient",
    "TrainingRun",
    "UnprocessableEntityError",
    "UnsupportedFeatureError",
    "__title__",
    "__version__",
    "types",
)
