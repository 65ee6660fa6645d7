"""The JSON encoder hook's fast path (format tables) writes exactly what tolist() + msgspec would write."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from hpcai_async import _tensor

_ENC = msgspec.json.Encoder(enc_hook=_tensor.json_enc_hook)
_REF = msgspec.json.Encoder()
_rng = np.random.default_rng(7)

ARRAYS = {
    "token ids": _rng.integers(0, 151_936, 4096),
    "int table edges": np.array([0, 1, 9, 10, 99, 100, 262_142, 262_143] * 64),
    "beyond the int table": np.arange(262_100, 262_400),
    "negative ints": _rng.integers(-5, 5, 400),
    "int32": np.arange(600, dtype=np.int32),
    "0/1 weights": _rng.integers(0, 2, 2048).astype(np.float32),
    "integral floats, whole table": np.arange(-1024, 64_512, dtype=np.float32),
    "integral float64": np.arange(-1024, 64_512, dtype=np.float64),
    "floats beyond the table": np.array([-1025.0, 64_512.0] * 200, dtype=np.float32),
    "negative zero": np.array([-0.0, 0.0, 1.0] * 100, dtype=np.float32),
    "fractions": (-_rng.exponential(3.0, 2048)).astype(np.float32),
    "integral first, then fractions": np.array([1.0, 0.5] * 200, dtype=np.float32),
    "nan and inf": np.array([np.nan, np.inf, 1.0] * 100, dtype=np.float32),
    "2-D": np.arange(600).reshape(20, 30),
    "small": np.arange(10),
}


@pytest.mark.parametrize("name", ARRAYS)
def test_same_bytes_as_tolist(name: str) -> None:
    arr = ARRAYS[name]
    assert _ENC.encode({"a": arr}) == _REF.encode({"a": arr.tolist()})


@pytest.mark.parametrize("name", ["token ids", "0/1 weights", "fractions", "negative zero"])
def test_values_round_trip_bit_for_bit(name: str) -> None:
    arr = ARRAYS[name]
    back = np.asarray(json.loads(_ENC.encode(arr)), dtype=arr.dtype)
    view = f"u{arr.dtype.itemsize}"
    assert np.array_equal(back.view(view), arr.view(view))


def test_as_array_flat_and_nested_lists() -> None:
    assert _tensor.as_array([1.5, 2.0], "float32").dtype == np.float32
    assert _tensor.as_array([[1, 2], [3, 4]], "int64").shape == (2, 2)
    with pytest.raises(ValueError, match="flat list of numbers"):
        _tensor.as_array(["x"], "float32")


def test_flat_lists_convert_exactly_as_numpy_does() -> None:
    """The struct-packed fast path gives numpy's values, and anything it refuses takes numpy's way."""
    rng = np.random.default_rng(0)
    floats = (rng.standard_normal(4096) * 1e3).astype(np.float32).astype(np.float64).tolist()
    floats += [0.0, -0.0, float("inf"), float("-inf"), 1e-45, 3.4028234663852886e38]
    out = _tensor.as_array(floats, "float32")
    assert out.dtype == np.float32 and out.flags.writeable
    assert np.array_equal(out.view(np.uint32), np.array(floats, np.float32).view(np.uint32))
    nan = _tensor.as_array([float("nan"), 1], "float32")
    assert np.isnan(nan[0]) and nan[1] == 1.0
    ids = [0, 1, 2**62, -5, 151_935]
    assert _tensor.as_array(ids, "int64").tolist() == ids
    assert _tensor.as_array([1.0, 2.0], "int64").tolist() == [1, 2]  # floats in an int64 tensor: numpy's cast
    assert _tensor.as_array([True, False], "float32").tolist() == [1.0, 0.0]
    assert _tensor.as_array([], "float32").shape == (0,)
