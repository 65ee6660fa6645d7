"""Tensors on the wire: numpy in and out, the dtype table, and the encoder hooks for JSON and MessagePack.

Only two dtypes exist on the wire (PROTOCOL.md §5.2): ``int64`` and ``float32``. In JSON a tensor travels as a
flat list of numbers; in MessagePack as the raw little-endian bytes of the array, so neither side touches one
Python object per element. torch is imported only by the functions that need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

TensorDtype = Literal["int64", "float32"]

DTYPES: dict[str, np.dtype[Any]] = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}


def wire_dtype(dtype: npt.DTypeLike) -> TensorDtype:
    """The wire dtype for a numpy (or torch) dtype: floats become float32, integers and bools int64."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return "float32"
    if kind in "iub":
        return "int64"
    raise ValueError(f"unsupported dtype {dtype!s}: tensors on the wire are int64 or float32")


def as_array(data: Any, dtype: str, shape: list[int] | None = None, *, what: str = "tensor") -> npt.NDArray[Any]:
    """``data`` (list, ndarray, raw little-endian bytes) as a numpy array of the wire ``dtype`` and ``shape``.

    Raises ValueError naming ``what`` when the dtype is unknown, the values are not numbers, or the shape does
    not fit. Arrays that already have the right dtype are returned without a copy.
    """
    np_dtype = DTYPES.get(dtype)
    if np_dtype is None:
        raise ValueError(f"{what}: dtype must be 'int64' or 'float32', got {dtype!r}")
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) % np_dtype.itemsize:
            raise ValueError(f"{what}: {len(data)} bytes is not a whole number of {dtype} values")
        arr = np.frombuffer(data, dtype=np_dtype)
    else:
        try:
            arr = np.asarray(data, dtype=np_dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: data must be a flat list of numbers ({exc})") from None
    if shape is not None:
        try:
            arr = arr.reshape(shape)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {arr.size} values do not fit shape {list(shape)}") from None
    return arr


def to_torch(arr: npt.NDArray[Any]) -> torch.Tensor:
    import torch

    # frombuffer arrays are read-only; torch wants writable memory
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def from_torch(tensor: torch.Tensor) -> npt.NDArray[Any]:
    arr: npt.NDArray[Any] = tensor.detach().cpu().numpy()
    return arr


def json_enc_hook(obj: Any) -> Any:
    """msgspec JSON hook: arrays become lists (one C call in numpy), numpy scalars become Python numbers."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def msgpack_enc_hook(obj: Any) -> Any:
    """msgspec MessagePack hook: arrays travel as their raw bytes (already in wire dtype, see types.TensorData)."""
    if isinstance(obj, np.ndarray):
        return memoryview(np.ascontiguousarray(obj)).cast("B")
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")
