"""What the server asks of an engine: the ``EngineAPI`` protocol, and every input rule, written once.

torch-free on purpose: the server, ``NullEngine`` and the real ``Engine`` all import it, and the server must
start (with ``NullEngine``) where torch is not installed.

Each ``check_*`` function is one request's rules; it raises ``BadRequestError`` naming the field and the fix,
and returns the request in checked form (``Batch``, ``AdamStep``, a ``SampleJob`` with its prompt ids), so the
device thread converts and scans nothing a second time. The model layout rules (``check_lora``: LoRA or
full-parameter) are ``layout``'s, exported here with the rest.

Threading: the server calls ``validate_*``, ``supported_models``, ``has_model``, ``spec`` and ``has_run`` on
its event loop (they must be quick: no model loading, no waiting on the engine's lock), and every other method
on one worker thread per device, one call at a time. Errors: raise ``BadRequestError`` / ``NotFoundError``
(from ``hpcai_async._errors``) for bad input; the message goes to the user as is, so say what was wrong and
how to fix it. A step that would make the run's weights or optimizer state non-finite raises
``non_finite(...)`` and changes nothing. (Over 400 lines: every input rule of the engine is here, once, so
that a rule is found in one place; the layout rules are ``layout.py``'s.)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
from msgspec import UnsetType

from .. import _tensor, types
from .._errors import BadRequestError
from .engine.losses import LOSSES, Loss
from .layout import (
    FULL_PARAM,
    MAX_LORA_RANK,
    SEED_RANGE,
    check_lora,
    check_lora_match,
    check_user_metadata,
    describe_layout,
)
from .layout import check_seed as _check_seed
from .models import ModelSpec

__all__ = (
    "FULL_PARAM",
    "MAX_LORA_RANK",
    "MAX_NUM_SAMPLES",
    "MAX_TOPK_PROMPT_LOGPROBS",
    "SEED_RANGE",
    "AdamStep",
    "Batch",
    "EngineAPI",
    "SampleJob",
    "check_adam",
    "check_batch",
    "check_lora",
    "check_lora_match",
    "check_loss_config",
    "check_sample",
    "check_user_metadata",
    "describe_layout",
    "non_finite",
)

MAX_NUM_SAMPLES: Final = 256  # per request: bounds one request's share of a sampling batch
MAX_TOPK_PROMPT_LOGPROBS: Final = 20  # vLLM's default max_logprobs: bounds the answer at 20 pairs per token
_QUOTE: Final = 200  # characters of a bad value an error message quotes at most (DESIGN: ~200)
_DTYPES: Final = {"int64": "<i8", "float32": "<f4"}  # the wire dtypes (PROTOCOL.md §5.2), little-endian


def non_finite(message: str) -> BadRequestError:
    """The error of a step that would make a weight, a gradient or the optimizer state NaN or infinite (the
    engine refuses it and changes nothing). A BadRequestError: the request's values caused it."""
    return BadRequestError(message, code="non_finite")


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleJob:
    """One ``asample`` / ``sample`` request, resolved by the server: the base model and, for a ``model_path``,
    the checkpoint folder holding the adapter (None samples the base model itself). ``prompt_ids`` is set by
    ``check_sample`` (the prompt as one int64 array); the engine checks a job that lacks it."""

    prompt: types.ModelInput
    params: types.SamplingParams
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0  # the k most likely tokens at each prompt position (0: none)
    base_model: str
    adapter_dir: Path | None = None
    prompt_ids: npt.NDArray[np.int64] | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """A checked forward/forward_backward batch: per datum, ``input_ids`` and each loss input as 1-D arrays
    (int64 token ids, float32 values, finite), all of one datum the same length; ``config`` is every
    setting of the loss (the request's ``loss_fn_config`` over the loss's defaults)."""

    loss_fn: str
    fields: dict[str, list[npt.NDArray[Any]]] = field(default_factory=dict)
    config: Mapping[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.fields["input_ids"])


@dataclass(frozen=True, slots=True)
class AdamStep:
    """Checked AdamW settings (``grad_clip_norm`` 0: no clipping) and the grad_accumulation_normalization
    (a ``types.GradAccNormalization`` value: what the accumulated gradient is divided by first)."""

    learning_rate: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip_norm: float
    normalization: str = "none"


class EngineAPI(Protocol):
    """The calls the server makes, with the real ``Engine``'s names (see the module docstring for threads).

    ``run_id`` is the model id ``create_model`` returned (the same string names the training run). The
    training calls take the checked form that ``validate_batch`` / ``check_adam`` return, or the raw request,
    which they check first. ``close`` is optional: the server calls it when the engine has one.
    """

    def supported_models(self) -> list[types.SupportedModel]: ...
    def has_model(self, base_model: str) -> bool: ...
    def spec(self, base_model: str) -> ModelSpec: ...
    def has_run(self, run_id: str) -> bool: ...

    def validate_batch(
        self,
        run_id: str,
        data: Sequence[types.Datum],
        loss_fn: str,
        config: Mapping[str, float] | None = None,
    ) -> Batch: ...
    def validate_sample(self, job: SampleJob) -> SampleJob: ...
    def validate_save(self, run_id: str, *, merged: bool) -> None:
        """BadRequestError, before the save is queued, when the run's weights cannot be saved so (``merged``:
        an adapter on a weight tied to another cannot merge)."""
        ...

    def create_run(
        self, run_id: str, base_model: str, lora: types.LoraConfig, *, frozen: bool = False
    ) -> None:
        """A run on ``base_model``: a LoRA adapter, or (``lora`` is ``FULL_PARAM``) all the weights, in a
        copy of its own; ``frozen``: a forward-only run of the base model as it is (layout ``FULL_PARAM``)."""
        ...

    def unload(self, run_id: str) -> None: ...
    def forward(
        self, run_id: str, data: Sequence[types.Datum] | Batch, loss_fn: str, *, reference: bool = False
    ) -> types.ForwardBackwardOutput:
        """Logprobs and losses; ``reference``: those of the run's base model without what the run trained."""
        ...

    def forward_backward(
        self, run_id: str, data: Sequence[types.Datum] | Batch, loss_fn: str
    ) -> types.ForwardBackwardOutput: ...
    def optim_step(self, run_id: str, adam: types.AdamParams | AdamStep) -> types.OptimStepResponse: ...
    def save(
        self, run_id: str, directory: str | Path, *, optimizer: bool = True, merged: bool = False
    ) -> None:
        """Write the run's adapter (and with ``optimizer`` its optimizer state) into ``directory`` (an empty
        folder inside the store; the server makes it a checkpoint atomically afterwards); ``merged``: a LoRA
        run's adapter merged into a copy of the base weights, written as a full-parameter checkpoint."""
        ...

    def load(self, run_id: str, directory: str | Path, *, optimizer: bool = False) -> None:
        """Load a folder written by ``save`` into the run (and its optimizer state with ``optimizer``)."""
        ...

    def sample(self, jobs: Sequence[SampleJob]) -> list[types.SampleResponse]:
        """One result per job, in order (the server batches concurrent requests into one call)."""
        ...


# ------------------------------------------------------------------------------------------ values


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE else text[:_QUOTE] + "…"


def _array(data: Any, dtype: str, shape: list[int] | None, what: str) -> npt.NDArray[Any]:
    """``data`` as a flat array of the wire ``dtype``: a flat list of numbers, raw little-endian bytes or an
    array of that kind. No silent conversion: 1.5, "5" and ``true`` are not token ids, nor "5" a number."""
    if dtype not in _DTYPES:
        raise BadRequestError(f"{what}: dtype must be one of {', '.join(_DTYPES)}; got {_quote(dtype)}")
    kind = "integers (token ids)" if dtype == "int64" else "numbers"
    if isinstance(data, list):
        allowed = (int,) if dtype == "int64" else (int, float)
        if not set(map(type, data)).issubset(allowed):  # one C-level pass: bool, str, list, None refused
            bad = next(v for v in data if type(v) not in allowed)
            raise BadRequestError(f"{what}: values must be {kind}, got {_quote(bad)}")
        arr = np.empty(len(data), dtype=_DTYPES[dtype])
        try:  # struct refuses values beyond the dtype's range (numpy would wrap, or warn and give inf)
            struct.pack_into(f"<{len(data)}{'q' if dtype == 'int64' else 'f'}", arr.data, 0, *data)
        except (struct.error, OverflowError):
            raise BadRequestError(f"{what}: a value is outside the {dtype} range") from None
    elif isinstance(data, np.ndarray) and data.dtype.kind not in ("iu" if dtype == "int64" else "iuf"):
        raise BadRequestError(f"{what}: values must be {kind}, got an array of {data.dtype}")
    elif not isinstance(data, bytes | bytearray | memoryview | np.ndarray):
        raise BadRequestError(f"{what}: must be a flat list of {kind}, got {_quote(data)}")
    else:  # raw bytes (MessagePack) or an array: _tensor's conversion, which checks the byte count
        try:
            arr = _tensor.as_array(data, dtype, what=what).reshape(-1)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
    if shape is not None and math.prod(shape) != arr.size:
        raise BadRequestError(f"{what}: {arr.size} values do not fit shape {_quote(shape)}")
    return arr


def _tokens(chunks: list[Any], where: str, vocab_size: int) -> npt.NDArray[np.int64]:
    """The token ids of a ModelInput's chunks as one array, each id inside the vocabulary."""
    parts = []
    for j, chunk in enumerate(chunks):
        what = f"{where}.chunks[{j}]"
        if not isinstance(chunk, types.EncodedTextChunk):
            raise BadRequestError(
                f"{what}: {type(chunk).__name__} inputs are not supported by this server; send text as "
                "encoded_text chunks of token ids (supported chunk types: encoded_text)"
            )
        parts.append(
            _in_vocab(_array(chunk.raw, "int64", None, f"{what}.tokens"), f"{what}.tokens", vocab_size)
        )
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _in_vocab(arr: npt.NDArray[np.int64], what: str, vocab_size: int) -> npt.NDArray[np.int64]:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
        raise BadRequestError(f"{what}: token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    return arr


# ------------------------------------------------------------------------------------------ requests


def check_batch(
    data: Sequence[types.Datum],
    loss_fn: str,
    *,
    vocab_size: int,
    max_context: int,
    where: str = "data",
    config: Mapping[str, float] | None = None,
) -> Batch:
    """A forward/forward_backward batch (and its ``loss_fn_config``), checked and converted; BadRequestError
    naming the first bad field."""
    loss = LOSSES.get(loss_fn)
    if loss is None:
        raise BadRequestError(f"loss_fn: {_quote(loss_fn)} is not supported; use one of {', '.join(LOSSES)}")
    settings = check_loss_config(loss, config)
    if not data:
        raise BadRequestError(f"{where}: the batch is empty; send at least one Datum")
    fields: dict[str, list[npt.NDArray[Any]]] = {"input_ids": [], **{k: [] for k in loss.inputs}}
    for i, datum in enumerate(data):
        at = f"{where}[{i}]"
        ids = _tokens(datum.model_input.chunks, f"{at}.model_input", vocab_size)
        n = int(ids.size)
        if n == 0:
            raise BadRequestError(f"{at}.model_input: no tokens; every datum needs at least one input token")
        if n > max_context:
            raise BadRequestError(
                f"{at}.model_input: {n} tokens is longer than the model's context of {max_context}"
            )
        fields["input_ids"].append(ids)
        for key, arr in _loss_inputs(datum.loss_fn_inputs, loss_fn, n, at, vocab_size).items():
            fields[key].append(arr)
    return Batch(loss_fn, fields, settings)


def check_loss_config(loss: Loss, config: Mapping[str, float] | None) -> dict[str, float]:
    """``config`` over ``loss``'s defaults: only its keys, finite numbers, clip low <= high, beta >= 0."""
    given = dict(config or {})
    allowed = ", ".join(loss.config) or "none: it takes no loss_fn_config"
    unknown = [k for k in given if k not in loss.config]
    if unknown:
        raise BadRequestError(
            f"loss_fn_config: unknown key(s) {', '.join(map(_quote, unknown[:5]))} for {loss.name}; "
            f"allowed keys: {allowed}"
        )
    for key, value in given.items():
        if not _num(value):
            raise BadRequestError(f"loss_fn_config.{key}: must be a finite number, got {_quote(value)}")
    settings = {**loss.config, **{k: float(v) for k, v in given.items()}}
    low, high = settings.get("clip_low_threshold", 0.0), settings.get("clip_high_threshold", math.inf)
    if low > high:
        raise BadRequestError(
            f"loss_fn_config: clip_low_threshold {low:g} is above clip_high_threshold {high:g}; they are "
            f"absolute ratio bounds (the {loss.name} defaults: {_quote(dict(loss.config))})"
        )
    if settings.get("beta", 0.0) < 0:
        raise BadRequestError(f"loss_fn_config.beta: must be >= 0, got {settings['beta']:g}")
    return settings


def _loss_inputs(
    inputs: dict[str, types.TensorData], loss_fn: str, n: int, at: str, vocab_size: int
) -> dict[str, npt.NDArray[Any]]:
    required = LOSSES[loss_fn].inputs
    missing = [k for k in required if k not in inputs]
    if missing:
        raise BadRequestError(
            f"{at}.loss_fn_inputs: {loss_fn} needs {', '.join(required)}; missing {', '.join(missing)}"
        )
    extra = [k for k in inputs if k not in required]
    if extra:
        raise BadRequestError(
            f"{at}.loss_fn_inputs: unexpected key(s) {_quote(', '.join(map(repr, extra)))}; "
            f"{loss_fn} takes exactly {', '.join(required)}"
        )
    out = {}
    for key, dtype in required.items():
        tensor = inputs[key]
        what = f"{at}.loss_fn_inputs.{key}"
        if tensor.dtype != dtype:
            raise BadRequestError(f"{what}: dtype must be {dtype}, got {_quote(tensor.dtype)}")
        arr = _array(tensor.raw, tensor.dtype, tensor.shape, what)
        if arr.size != n:
            raise BadRequestError(
                f"{what}: {arr.size} values, but model_input has {n} tokens; per-token inputs are "
                "aligned with the input (inputs = sequence[:-1], targets = sequence[1:])"
            )
        if dtype == "int64":
            _in_vocab(arr, what, vocab_size)
        elif arr.size and not np.isfinite(arr).all():
            raise BadRequestError(f"{what}: values must be finite (found NaN or infinity)")
        out[key] = arr
    return out


def check_sample(job: SampleJob, *, vocab_size: int, max_context: int) -> SampleJob:
    """A sampling request, checked; the same job with ``prompt_ids`` set. BadRequestError naming the field."""
    if not 1 <= job.num_samples <= MAX_NUM_SAMPLES:
        raise BadRequestError(
            f"num_samples: must be in [1, {MAX_NUM_SAMPLES}] per request, got {job.num_samples}; "
            "send several requests for more"
        )
    k = job.topk_prompt_logprobs
    if not 0 <= k <= MAX_TOPK_PROMPT_LOGPROBS:
        raise BadRequestError(
            f"topk_prompt_logprobs: must be in [0, {MAX_TOPK_PROMPT_LOGPROBS}] (0: none), got {_quote(k)}"
        )
    ids = _tokens(job.prompt.chunks, "prompt", vocab_size)
    n = int(ids.size)
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
    _check_seed(params.seed, "sampling_params.seed")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise BadRequestError(f"sampling_params.temperature: must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise BadRequestError(f"sampling_params.top_p: must be in (0, 1], got {params.top_p}")
    k = params.top_k
    if isinstance(k, bool) or not isinstance(k, int) or k == 0 or k < -1:
        raise BadRequestError(
            f"sampling_params.top_k: must be -1 (no limit) or a positive integer, got {k!r}"
        )
    _check_stop(params.stop, vocab_size)
    return replace(job, prompt_ids=ids)


def _check_stop(stop: Any, vocab_size: int) -> None:
    if stop is None:
        return
    if isinstance(stop, str):
        if not stop:
            raise BadRequestError("sampling_params.stop: an empty stop string would stop at once")
        return
    if not isinstance(stop, list):
        raise BadRequestError(
            "sampling_params.stop: must be a string, a list of strings or a list of token ids"
        )
    kinds = set(map(type, stop))
    if not (kinds <= {str} or kinds <= {int}):
        raise BadRequestError(
            "sampling_params.stop: give a list of strings or a list of token ids, not a mix"
        )
    for k, item in enumerate(stop):
        if isinstance(item, int) and not 0 <= item < vocab_size:
            raise BadRequestError(
                f"sampling_params.stop[{k}]: token id {_quote(item)} is outside [0, {vocab_size})"
            )
        if isinstance(item, str) and not item:
            raise BadRequestError(f"sampling_params.stop[{k}]: an empty stop string would stop at once")


def check_adam(adam: types.AdamParams | AdamStep, normalization: Any = "none") -> AdamStep:
    """An optim_step's adam_params (and grad_accumulation_normalization), checked; BadRequestError naming
    the parameter."""
    if isinstance(adam, AdamStep):
        return adam
    modes = [m.value for m in types.GradAccNormalization]
    mode = normalization.value if isinstance(normalization, types.GradAccNormalization) else normalization
    if mode not in modes:
        raise BadRequestError(
            f"grad_accumulation_normalization: must be one of {', '.join(modes)}, got {_quote(mode)}"
        )
    wd = 0.0 if isinstance(adam.weight_decay, UnsetType) else adam.weight_decay
    clip = 0.0 if isinstance(adam.grad_clip_norm, UnsetType) else adam.grad_clip_norm
    lr, b1, b2, eps = adam.learning_rate, adam.beta1, adam.beta2, adam.eps
    rules: tuple[tuple[str, Any, str, bool], ...] = (
        ("learning_rate", lr, ">= 0", _num(lr) and lr >= 0),
        ("beta1", b1, "in [0, 1)", _num(b1) and 0 <= b1 < 1),
        ("beta2", b2, "in [0, 1)", _num(b2) and 0 <= b2 < 1),
        ("eps", eps, ">= 0", _num(eps) and eps >= 0),
        ("weight_decay", wd, ">= 0", _num(wd) and wd >= 0),
        ("grad_clip_norm", clip, ">= 0 (0: no clipping)", _num(clip) and clip >= 0),
    )
    for name, value, rule, ok in rules:
        if not ok:
            raise BadRequestError(f"adam_params.{name}: must be a finite number {rule}, got {_quote(value)}")
    return AdamStep(float(lr), (float(b1), float(b2)), float(eps), float(wd), float(clip), mode)


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
