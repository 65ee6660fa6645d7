"""What the server asks of an engine: the ``EngineAPI`` protocol, the sampling job, and shared input checks.

torch-free on purpose: the server, ``NullEngine`` and the real ``Engine`` all import it, and the server must
start (with ``NullEngine``) where torch is not installed.

Threading: the server calls ``validate_*``, ``supported_models``, ``has_model``, ``spec`` and ``has_run`` on
its event loop (they must be quick: no model loading, no waiting on the engine's lock), and every other method
on one worker thread per device, one call at a time. Errors: raise ``BadRequestError`` / ``NotFoundError``
(from ``hpcai_async._errors``) for bad input; the message goes to the user as is, so say what was wrong and
how to fix it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import _tensor, types
from .._errors import BadRequestError
from .models import ModelSpec

__all__ = ("LOSS_FN_INPUTS", "EngineAPI", "SampleJob", "check_batch", "check_sample")

# Required loss_fn_inputs per loss function and their dtypes (PROTOCOL.md §5.3).
LOSS_FN_INPUTS: dict[str, dict[str, str]] = {
    "cross_entropy": {"target_tokens": "int64", "weights": "float32"},
    "importance_sampling": {"target_tokens": "int64", "logprobs": "float32", "advantages": "float32"},
    "ppo": {"target_tokens": "int64", "logprobs": "float32", "advantages": "float32"},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleJob:
    """One ``asample`` / ``sample`` request, resolved by the server: the base model and, for a ``model_path``,
    the checkpoint folder holding the adapter (None samples the base model itself)."""

    prompt: types.ModelInput
    params: types.SamplingParams
    num_samples: int = 1
    prompt_logprobs: bool = False
    base_model: str
    adapter_dir: Path | None = None


class EngineAPI(Protocol):
    """The calls the server makes, with the real ``Engine``'s names (see the module docstring for threads).

    ``run_id`` is the model id ``create_model`` returned (the same string names the training run).
    ``close`` is optional: the server calls it when the engine has one.
    """

    def supported_models(self) -> list[types.SupportedModel]: ...
    def has_model(self, base_model: str) -> bool: ...
    def spec(self, base_model: str) -> ModelSpec: ...
    def has_run(self, run_id: str) -> bool: ...

    def validate_batch(self, run_id: str, data: list[types.Datum], loss_fn: str) -> None: ...
    def validate_sample(self, job: SampleJob) -> None: ...

    def create_run(self, run_id: str, base_model: str, lora: types.LoraConfig) -> None: ...
    def unload(self, run_id: str) -> None: ...
    def forward(self, run_id: str, data: list[types.Datum], loss_fn: str) -> types.ForwardBackwardOutput: ...
    def forward_backward(
        self, run_id: str, data: list[types.Datum], loss_fn: str
    ) -> types.ForwardBackwardOutput: ...
    def optim_step(self, run_id: str, adam: types.AdamParams) -> types.OptimStepResponse: ...
    def save(self, run_id: str, directory: str | Path, *, optimizer: bool = True) -> None:
        """Write the run's adapter (and with ``optimizer`` its optimizer state) into ``directory`` (an empty
        folder inside the store; the server makes it a checkpoint atomically afterwards)."""
        ...

    def load(self, run_id: str, directory: str | Path, *, optimizer: bool = False) -> None:
        """Load a folder written by ``save`` into the run (and its optimizer state with ``optimizer``)."""
        ...

    def sample(self, jobs: Sequence[SampleJob]) -> list[types.SampleResponse]:
        """One result per job, in order (the server batches concurrent requests into one call)."""
        ...


def _tokens(chunks: list[Any], where: str, vocab_size: int) -> int:
    n = 0
    for j, chunk in enumerate(chunks):
        if not isinstance(chunk, types.EncodedTextChunk):
            raise BadRequestError(
                f"{where}.chunks[{j}]: {type(chunk).__name__} inputs are not supported by this server; "
                "send text as encoded_text chunks of token ids"
            )
        arr = _tensor.as_array(chunk.raw, "int64", what=f"{where}.chunks[{j}].tokens").reshape(-1)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
            bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
            raise BadRequestError(
                f"{where}.chunks[{j}].tokens: token id {bad} is outside the model's vocabulary "
                f"[0, {vocab_size})"
            )
        n += int(arr.size)
    return n


def check_batch(
    data: list[types.Datum], loss_fn: str, *, vocab_size: int, max_context: int, where: str = "data"
) -> None:
    """Structural checks of a forward/forward_backward batch; BadRequestError naming the first bad field."""
    required = LOSS_FN_INPUTS.get(loss_fn)
    if required is None:
        raise BadRequestError(
            f"loss_fn: {loss_fn!r} is not supported; use one of {', '.join(LOSS_FN_INPUTS)}"
        )
    if not data:
        raise BadRequestError(f"{where}: the batch is empty; send at least one Datum")
    for i, datum in enumerate(data):
        at = f"{where}[{i}]"
        n = _tokens(datum.model_input.chunks, f"{at}.model_input", vocab_size)
        if n == 0:
            raise BadRequestError(f"{at}.model_input: no tokens; every datum needs at least one input token")
        if n > max_context:
            raise BadRequestError(
                f"{at}.model_input: {n} tokens is longer than the model's context of {max_context}"
            )
        inputs = datum.loss_fn_inputs
        missing = [k for k in required if k not in inputs]
        if missing:
            raise BadRequestError(
                f"{at}.loss_fn_inputs: {loss_fn} needs {', '.join(required)}; missing {', '.join(missing)}"
            )
        extra = [k for k in inputs if k not in required]
        if extra:
            raise BadRequestError(
                f"{at}.loss_fn_inputs: unexpected key(s) {', '.join(map(repr, extra))}; "
                f"{loss_fn} takes exactly {', '.join(required)}"
            )
        for key, dtype in required.items():
            tensor = inputs[key]
            what = f"{at}.loss_fn_inputs.{key}"
            arr = _tensor.as_array(tensor.raw, tensor.dtype, tensor.shape, what=what).reshape(-1)
            if arr.size != n:
                raise BadRequestError(
                    f"{what}: {arr.size} values, but model_input has {n} tokens; per-token inputs are "
                    "aligned with the input (inputs = sequence[:-1], targets = sequence[1:])"
                )
            if dtype == "int64":
                if tensor.dtype != "int64":
                    raise BadRequestError(f"{what}: dtype must be int64 (token ids), got {tensor.dtype}")
                if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
                    raise BadRequestError(f"{what}: token ids must lie in [0, {vocab_size})")
            elif arr.size and not np.isfinite(arr.astype(np.float32, copy=False)).all():
                raise BadRequestError(f"{what}: values must be finite (found NaN or infinity)")


def check_sample(job: SampleJob, *, vocab_size: int, max_context: int) -> None:
    """Structural checks of a sampling request; BadRequestError naming the first bad field."""
    if job.num_samples < 1:
        raise BadRequestError(f"num_samples: must be at least 1, got {job.num_samples}")
    n = _tokens(job.prompt.chunks, "prompt", vocab_size)
    if n == 0:
        raise BadRequestError("prompt: no tokens; a prompt needs at least one token")
    params = job.params
    if params.max_tokens is not None:
        if params.max_tokens < 1:
            raise BadRequestError(f"sampling_params.max_tokens: must be at least 1, got {params.max_tokens}")
        if n + params.max_tokens > max_context:
            raise BadRequestError(
                f"sampling_params.max_tokens: prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {max_context}"
            )
    elif n >= max_context:
        raise BadRequestError(f"prompt: {n} tokens leaves no room in the model's context of {max_context}")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise BadRequestError(f"sampling_params.temperature: must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise BadRequestError(f"sampling_params.top_p: must be in (0, 1], got {params.top_p}")
    if params.top_k == 0 or params.top_k < -1:
        raise BadRequestError(f"sampling_params.top_k: must be -1 (no limit) or positive, got {params.top_k}")
    stop = params.stop
    if isinstance(stop, list):
        for k, item in enumerate(stop):
            if isinstance(item, int) and not 0 <= item < vocab_size:
                raise BadRequestError(
                    f"sampling_params.stop[{k}]: token id {item} is outside [0, {vocab_size})"
                )
            if isinstance(item, str) and not item:
                raise BadRequestError(f"sampling_params.stop[{k}]: an empty stop string would stop at once")
