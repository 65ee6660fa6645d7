"""Tensors on the wire: numpy in and out, the dtype table, and the encoder hooks for JSON and MessagePack.

Only two dtypes exist on the wire (PROTOCOL.md §5.2): ``int64`` and ``float32``. In JSON a tensor travels as a
flat list of numbers; in MessagePack as the raw little-endian bytes of the array, so neither side touches one
Python object per element.

numpy is imported on first use, not with this module (60-110 ms here, against a 150 ms package import budget):
no array can exist before numpy is imported, so ``is_array`` and the encoder hooks need not import it. torch
is imported only by the functions that need it.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import TYPE_CHECKING, Any, Literal

import msgspec

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

TensorDtype = Literal["int64", "float32"]

DTYPES: dict[str, np.dtype[Any]]  # {"int64": <i8, "float32": <f4}; made on first access, see __getattr__
_dtypes: dict[str, np.dtype[Any]] = {}


def _wire_dtypes() -> dict[str, np.dtype[Any]]:
    if not _dtypes:
        import numpy as np

        _dtypes.update({"int64": np.dtype("<i8"), "float32": np.dtype("<f4")})
    return _dtypes


def __getattr__(name: str) -> Any:
    if name == "DTYPES":
        return _wire_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_array(obj: Any) -> bool:
    """``isinstance(obj, numpy.ndarray)``, without importing numpy."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def wire_dtype(dtype: npt.DTypeLike) -> TensorDtype:
    """The wire dtype for a numpy (or torch) dtype: floats become float32, integers and bools int64."""
    import numpy as np

    kind = np.dtype(dtype).kind
    if kind == "f":
        return "float32"
    if kind in "iub":
        return "int64"
    raise ValueError(f"unsupported dtype {dtype!s}: tensors on the wire are int64 or float32")


def as_array(
    data: Any, dtype: str, shape: list[int] | None = None, *, what: str = "tensor"
) -> npt.NDArray[Any]:
    """``data`` (list, ndarray, raw little-endian bytes) as a numpy array of the wire ``dtype`` and ``shape``.

    Raises ValueError naming ``what`` when the dtype is unknown, the values are not numbers, or the shape does
    not fit. Arrays that already have the right dtype are returned without a copy.
    """
    import numpy as np

    np_dtype = _wire_dtypes().get(dtype)
    if np_dtype is None:
        raise ValueError(f"{what}: dtype must be 'int64' or 'float32', got {dtype!r}")
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) % np_dtype.itemsize:
            raise ValueError(f"{what}: {len(data)} bytes is not a whole number of {dtype} values")
        arr = np.frombuffer(data, dtype=np_dtype)
    else:
        try:
            if isinstance(data, list):
                arr = _from_flat_list(data, np_dtype)
            else:
                arr = np.asarray(data, dtype=np_dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: data must be a flat list of numbers ({exc})") from None
    if shape is not None:
        try:
            arr = arr.reshape(shape)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {arr.size} values do not fit shape {list(shape)}") from None
    return arr


def _from_flat_list(data: list[Any], np_dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """A flat list of numbers (the JSON wire form) as an array, ~2x faster than ``np.array``.

    ``struct`` packs the values straight into the array's memory, without numpy's pass that discovers the
    dtype; anything it refuses (nested lists, floats in an int64 tensor, values beyond float32) goes the
    general way.
    """
    import numpy as np

    arr = np.empty(len(data), dtype=np_dtype)
    try:
        struct.pack_into(f"<{len(data)}{'f' if np_dtype.kind == 'f' else 'q'}", arr.data, 0, *data)
    except (struct.error, OverflowError, TypeError):
        arr = np.asarray(data, dtype=np_dtype)
    return arr


def to_torch(arr: npt.NDArray[Any]) -> torch.Tensor:
    import torch

    # frombuffer arrays are read-only; torch wants writable memory
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def from_torch(tensor: torch.Tensor) -> npt.NDArray[Any]:
    arr: npt.NDArray[Any] = tensor.detach().cpu().numpy()
    return arr


# JSON text for big arrays. Going through Python objects (``tolist()`` + msgspec) costs ~25-30 ns a number;
# for the common cases -- token ids, and integral float weights such as 0/1 loss masks -- numpy builds the
# list from a table of pre-formatted ``"digits,"`` strings instead (~9 ns a number): gather the 8-byte
# entries, drop the NUL padding, add brackets. Anything else (negative ids, fractions, NaN) uses tolist().
_FAST_MIN_SIZE = 256  # below this tolist() is as fast and no table is needed
_INT_TABLE_SIZE = 1 << 18  # ids 0..262,143: every vocabulary we know (Qwen3 151,936; Gemma 262,144)
_FLOAT_TABLE_MIN = -1024  # integral floats -1024.0 .. 64,511.0: the longest, "-1024.0,", fits 8 bytes
_FLOAT_TABLE_SIZE = 1 << 16
_tables: dict[str, npt.NDArray[np.uint64]] = {}


def _format_table(size: int, offset: int, suffix: bytes) -> npt.NDArray[np.uint64]:
    """Entry i: the ASCII of ``str(i + offset) + suffix``, right-aligned in 8 bytes (NULs on the left)."""
    import numpy as np

    values = np.arange(offset, offset + size, dtype=np.int32)
    magnitude = np.abs(values)[:, None]
    width = len(str(int(magnitude.max())))
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int32)  # most significant digit first
    digits = np.where((magnitude >= powers) | (powers == 1), magnitude // powers % 10 + 48, 0)
    chars = np.zeros((size, 8), dtype=np.uint8)
    end = 8 - len(suffix)
    chars[:, end:] = np.frombuffer(suffix, dtype=np.uint8)
    chars[:, end - width : end] = digits
    # the minus sign goes just left of the first digit
    neg = np.flatnonzero(values < 0)
    chars[neg, end - 1 - np.count_nonzero(digits[neg], axis=1)] = ord("-")
    return chars.view(np.uint64).reshape(size)


def _table(name: str) -> npt.NDArray[np.uint64]:
    table = _tables.get(name)
    if table is None:  # built on first use (~20 ms); a race only builds it twice
        if name == "int":
            table = _format_table(_INT_TABLE_SIZE, 0, b",")
        else:
            table = _format_table(_FLOAT_TABLE_SIZE, _FLOAT_TABLE_MIN, b".0,")
        _tables[name] = table
    return table


def _join(codes: npt.NDArray[np.uint64]) -> msgspec.Raw:
    text = codes.tobytes().translate(None, b"\0")
    return msgspec.Raw(b"[" + text[:-1] + b"]")


def _fast_json(arr: npt.NDArray[Any]) -> msgspec.Raw | None:
    """The JSON list of a 1-D array through a format table, or None when the array does not qualify."""
    import numpy as np

    kind = arr.dtype.kind
    if kind == "i":
        lo, hi = arr.min(), arr.max()
        if lo >= 0 and hi < _INT_TABLE_SIZE:
            return _join(_table("int").take(arr))
    elif kind == "f" and arr.dtype.itemsize in (4, 8):
        first = arr[0].item()
        if not (math.isfinite(first) and first == int(first)):
            return None  # fractions (logprobs, advantages): skip the whole-array checks below
        lo, hi = arr.min(), arr.max()  # NaN fails both tests below
        if lo >= _FLOAT_TABLE_MIN and hi < _FLOAT_TABLE_MIN + _FLOAT_TABLE_SIZE:
            ints = arr.astype(np.int64)
            # integral iff the value survives the round trip bit for bit (which also keeps -0.0 out)
            uint = f"u{arr.dtype.itemsize}"
            if np.array_equal(ints.astype(arr.dtype).view(uint), arr.view(uint)):
                return _join(_table("float").take(ints - _FLOAT_TABLE_MIN))
    return None


def json_enc_hook(obj: Any) -> Any:
    """msgspec JSON hook: arrays become JSON lists (via a format table or tolist()), numpy scalars numbers."""
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            if obj.ndim == 1 and obj.size >= _FAST_MIN_SIZE:
                raw = _fast_json(obj)
                if raw is not None:
                    return raw
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def msgpack_enc_hook(obj: Any) -> Any:
    """msgspec MessagePack hook: arrays travel as raw bytes (already in wire dtype, see types.TensorData)."""
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return memoryview(np.ascontiguousarray(obj)).cast("B")
        if isinstance(obj, np.generic):
            return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")
