"""The wire rules client and server share (hpcai_async._wire): codecs, error bodies, status table, paths."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from hpcai_async import _errors, _wire, types


@pytest.mark.parametrize("msgpack", [False, True])
def test_codecs_round_trip_a_datum_with_tensors(msgpack: bool) -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"weights": types.TensorData.from_numpy(np.array([0.5, 1.0, 2.0], dtype=np.float32))},
    )
    data, content_type = _wire.encode(datum, msgpack)
    assert _wire.is_msgpack(content_type) is msgpack
    back = _wire.decoder(types.Datum, msgpack).decode(data)
    assert back.model_input.to_ints() == [1, 2, 3]
    assert back.loss_fn_inputs["weights"].to_numpy().tolist() == [0.5, 1.0, 2.0]
    assert _wire.decoder(types.Datum, msgpack) is _wire.decoder(types.Datum, msgpack)  # made once


def test_error_bodies_parse_with_their_code_in_every_shape() -> None:
    ours = msgspec.json.encode(_wire.error_body("ConflictError", "seq_id 3 was sent", "sequence_conflict"))
    assert _wire.parse_error_body(ours, _wire.JSON) == ("seq_id 3 was sent", "sequence_conflict")
    packed = msgspec.msgpack.encode(_wire.error_body("NotFoundError", "no such run"))
    assert _wire.parse_error_body(packed, _wire.MSGPACK) == ("no such run", "NotFoundError")
    assert _wire.parse_error_body(b'{"detail": "bad"}', _wire.JSON) == ("bad", None)
    assert _wire.parse_error_body(b"oops", "text/plain") == ("oops", None)
    assert _wire.parse_error_body(b"", _wire.JSON) == ("(empty body)", None)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422, 429, 500])
def test_the_status_table_reads_both_ways(status: int) -> None:
    name = _wire.error_name(status)
    assert _wire.status_for_error(name) == status
    assert _errors.error_for_status(_wire.status_for_error(name)).__name__ == name


def test_unknown_error_names_are_500() -> None:
    assert _wire.status_for_error("SomethingElse") == 500
    assert _wire.status_for_error("APIStatusError") == 500


@pytest.mark.parametrize("value", [None, "", "x", "nan", "-1", "0"])
def test_inline_wait_ignores_bad_values(value: str | None) -> None:
    assert _wire.inline_wait(value) == 0.0


def test_inline_wait_is_capped() -> None:
    assert _wire.inline_wait("0.01") == 0.01
    assert _wire.inline_wait("100") == _wire.INLINE_WAIT_MAX


@pytest.mark.parametrize("scheme", _wire.CHECKPOINT_SCHEMES)
@pytest.mark.parametrize(
    ("rest", "expected"),
    [
        ("run-1/weights/step1_training", ("run-1", "training", "step1_training")),
        ("run-1/sampler_weights/step1_sampler", ("run-1", "sampler", "step1_sampler")),
        ("run-1/training/step1", ("run-1", "training", "step1")),
        ("run-1/sampler/step1.tar.gz", ("run-1", "sampler", "step1")),
    ],
)
def test_both_schemes_parse_to_the_same_parts(scheme: str, rest: str, expected: tuple[str, str, str]) -> None:
    assert tuple(_wire.parse_checkpoint_path(scheme + rest)) == expected
    assert _wire.is_checkpoint_path(scheme + rest)


@pytest.mark.parametrize(
    "path", ["hpcai://run 1/weights/x", "tinker://r/weights/../x", "hpcai://r/weights/a/b", "x" * 1000]
)
def test_strict_parsing_refuses_ids_the_server_cannot_have_made(path: str) -> None:
    with pytest.raises(_errors.BadRequestError, match=r"^path: not a checkpoint path") as info:
        _wire.parse_checkpoint_path(path, field="path", strict=True, error=_errors.BadRequestError)
    assert len(str(info.value)) < 400  # the value is quoted short


def test_checkpoint_paths_are_written_in_the_hosted_form() -> None:
    assert _wire.checkpoint_path_for("r", "s_training", "training") == "hpcai://r/weights/s_training"
    assert _wire.checkpoint_path_for("r", "s_sampler", "sampler") == "hpcai://r/sampler_weights/s_sampler"
