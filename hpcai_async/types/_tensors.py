"""Tensor payloads and model inputs: TensorData, the input chunks, ModelInput and Datum.

Payloads are carried as a list, a numpy array or raw little-endian bytes (``.raw``) and always read as a
list of Python numbers (``_list_view``); the structs keep their own copy of what the caller passed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from msgspec import Struct

from .. import _tensor
from .._tensor import TensorDtype

if TYPE_CHECKING:
    import torch

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
