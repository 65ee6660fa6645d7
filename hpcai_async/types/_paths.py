"""The official SDK's module paths under ``hpcai.types``, as thin aliases of ``hpcai_async.types``.

Programs written for the official SDK import types from their submodules
(``from hpcai.types.tensor_data import TensorData``). Each such module exists here too, made at import time
from the table below (one line a module, no file each): a module object whose names are the very objects of
``hpcai_async.types``. ``tests/test_public_api.py`` checks the table against the official package.
Left out: the official SDK's request-parameter TypedDicts (``*Param``, ``*Params``: its raw HTTP client's
arguments) and its telemetry event types (issue 9 item 6).
"""

from __future__ import annotations

import sys
import types as _pytypes

__all__ = ("MODULES", "register")

# submodule of hpcai.types -> the names it exports (its __all__)
MODULES: dict[str, tuple[str, ...]] = {
    "checkpoint": (
        "Checkpoint",
        "CheckpointType",
        "ParsedCheckpointPath",
    ),
    "checkpoints_list_response": ("CheckpointsListResponse",),
    "compute_logprobs_response": ("ComputeLogprobsResponse",),
    "create_model_request": ("CreateModelRequest",),
    "create_model_response": ("CreateModelResponse",),
    "cursor": ("Cursor",),
    "datum": ("Datum",),
    "encoded_text_chunk": ("EncodedTextChunk",),
    "error_response": ("ErrorResponse",),
    "forward_backward_input": ("ForwardBackwardInput",),
    "forward_backward_output": ("ForwardBackwardOutput",),
    "get_info_request": ("GetInfoRequest",),
    "get_info_response": (
        "GetInfoResponse",
        "ModelData",
    ),
    "get_server_capabilities_response": (
        "GetServerCapabilitiesResponse",
        "SupportedModel",
    ),
    "health_response": ("HealthResponse",),
    "image_asset_pointer_chunk": ("ImageAssetPointerChunk",),
    "load_weights_request": ("LoadWeightsRequest",),
    "load_weights_response": ("LoadWeightsResponse",),
    "lora_config": ("LoraConfig",),
    "loss_fn_inputs": ("LossFnInputs",),
    "loss_fn_output": ("LossFnOutput",),
    "loss_fn_type": ("LossFnType",),
    "model_id": ("ModelID",),
    "model_input": ("ModelInput",),
    "model_input_chunk": ("ModelInputChunk",),
    "optim_step_request": (
        "OptimStepRequest",
        "AdamParams",
    ),
    "optim_step_response": ("OptimStepResponse",),
    "request_id": ("RequestID",),
    "sample_request": ("SampleRequest",),
    "sample_response": ("SampleResponse",),
    "sampled_sequence": ("SampledSequence",),
    "sampling_params": ("SamplingParams",),
    "save_weights_for_sampler_request": ("SaveWeightsForSamplerRequest",),
    "save_weights_for_sampler_response": ("SaveWeightsForSamplerResponse",),
    "save_weights_request": ("SaveWeightsRequest",),
    "save_weights_response": ("SaveWeightsResponse",),
    "shared.untyped_api_future": ("UntypedAPIFuture",),
    "stop_reason": ("StopReason",),
    "tensor_data": ("TensorData",),
    "tensor_dtype": ("TensorDtype",),
    "training_run": ("TrainingRun",),
    "training_runs_response": ("TrainingRunsResponse",),
    "try_again_response": ("TryAgainResponse",),
    "unload_model_request": ("UnloadModelRequest",),
    "unload_model_response": ("UnloadModelResponse",),
}


def register() -> None:
    """Put ``hpcai_async.types.<submodule>`` for every entry of MODULES into ``sys.modules``."""
    package = sys.modules[__name__.rsplit(".", 1)[0]]
    for path, names in MODULES.items():
        parent = package
        for depth, part in enumerate(path.split("."), start=1):
            full = f"{package.__name__}.{'.'.join(path.split('.')[:depth])}"
            module = sys.modules.get(full)
            if module is None:
                module = _pytypes.ModuleType(full, f"Alias of the official ``hpcai.types.{path}``.")
                module.__package__ = parent.__name__ if depth > 1 else package.__name__
                module.__all__ = ()  # type: ignore[attr-defined]
                sys.modules[full] = module
                setattr(parent, part, module)
            parent = module
        for name in names:
            setattr(parent, name, getattr(package, name))
        parent.__all__ = names  # type: ignore[attr-defined]
