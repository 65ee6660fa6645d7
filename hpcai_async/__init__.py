"""hpcai_async: an async-first, pipelined client for the HPC-AI fine-tuning API (and an offline local server).

    from hpcai_async import ServiceClient, types

    async with ServiceClient() as service:                      # HPCAI_BASE_URL / HPCAI_API_KEY
        tc = await service.create_lora_training_client_async("Qwen/Qwen3-8B", rank=16)
        fb = await tc.forward_backward_async(batch, "cross_entropy")    # submitted, in call order
        opt = await tc.optim_step_async(types.AdamParams(learning_rate=1e-4))
        print((await fb).metrics, (await opt).metrics)           # both were in flight together

Every operation is a coroutine ``x_async`` and a plain ``x`` (for scripts, threads and notebooks).
"""

from . import types
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
)
from ._futures import APIFuture, QueueState
from ._retry import RetryConfig
from ._version import __version__
from .rest import RestClient
from .sampling import SamplingClient
from .service import ServiceClient
from .training import TrainingClient

__all__ = (
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "GoneError",
    "HpcaiError",
    "IdempotencyConflictError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "QueueState",
    "RateLimitError",
    "RequestFailedError",
    "RestClient",
    "RetryBudgetExceededError",
    "RetryConfig",
    "SamplingClient",
    "SequenceConflictError",
    "ServiceClient",
    "TrainingClient",
    "UnprocessableEntityError",
    "__version__",
    "types",
)
