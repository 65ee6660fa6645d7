"""The codec floor's structs: the wire format as a plain msgspec user writes it (lists, no hooks, no numpy).

Module level (not inside a function) so msgspec resolves the annotations; imported only in our venv's
children (the official and tinker venvs have no need of it).
"""

from __future__ import annotations

from typing import Any

import msgspec


class Tensor(msgspec.Struct):
    data: list[float]
    dtype: str
    shape: list[int] | None = None


class IntTensor(msgspec.Struct):
    data: list[int]
    dtype: str
    shape: list[int] | None = None


class Chunk(msgspec.Struct, tag="encoded_text", tag_field="type"):
    tokens: list[int]


class Input(msgspec.Struct):
    chunks: list[Chunk]


class Datum(msgspec.Struct):
    loss_fn_inputs: dict[str, Any]  # IntTensor or Tensor values (encoded only)
    model_input: Input


class FBInput(msgspec.Struct):
    data: list[Datum]
    loss_fn: str


class FBRequest(msgspec.Struct):
    forward_backward_input: FBInput
    model_id: str


class FBOutput(msgspec.Struct):
    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, Tensor]]
    metrics: dict[str, float]
