"""Encoding a forward_backward request and decoding its output, from and to numpy: no network, no server.

Request: 64 datums x 2048 tokens (token ids drawn from a 151,936-token vocabulary, int64 targets, 0/1
float32 weights with the prompt quarter masked), built from numpy arrays, up to the request body bytes.

- ours: ``types.Datum`` / ``ForwardBackwardRequest`` from the arrays, then the client's own encoder
  (``hpcai_async._wire``) — JSON (hosted service) or MessagePack with raw tensor bytes (our server).
- official: what hpcai 0.2.0 does for the same call — ``TensorData.from_numpy``, ``ModelInput.from_ints``,
  ``Datum``, ``ForwardBackwardInput(...).model_dump()``, ``maybe_transform`` to the request params, and
  httpx's JSON body (``httpx.Request(json=...)``), see ``hpcai/lib/public_interfaces/training_client.py``.

Output: the body of a ForwardBackwardOutput for the same batch (per datum ``logprobs`` and
``elementwise_loss``, float32), to numpy arrays of both:

- ours: the client's decoder into ``types.ForwardBackwardOutput``, then ``TensorData.to_numpy()``.
- official: ``json.loads`` (httpx ``response.json()``), ``ForwardBackwardOutput.model_validate``, the
  ``combine_fwd_bwd_output_results`` it always applies, then ``TensorData.to_numpy()``.

Both decode the very same JSON bytes. Every path is checked to round-trip the float32 values exactly. Run:
``python -m bench.codec``.
"""

from __future__ import annotations

from typing import Any

from bench import _official
from bench._common import (
    BATCH,
    MODEL,
    SEQ,
    errors,
    make_batch,
    make_output_arrays,
    median,
    meets,
    report,
    row,
    timeit,
)

TARGETS = {"encode_json": 15.0, "encode_msgpack": 80.0, "decode_json": 10.0, "decode_msgpack": 200.0}
TARGET_OF_PLAIN = 0.5  # hosted JSON within 2x of plain msgspec on the same structs (issue 13)
TINKER = "0.38.0"


# --------------------------------------------------------------------------------------------- ours


def _codecs() -> dict[str, Any]:
    """The encoders/decoders the client really uses (``hpcai_async._wire``), keyed by wire format."""
    from hpcai_async import _wire

    def wire(msgpack: bool) -> dict[str, Any]:
        return {
            "encode": lambda body: _wire.encode(body, msgpack)[0],
            "decode": lambda body, tp: _wire.decoder(tp, msgpack).decode(body),
        }

    return {"json": wire(False), "msgpack": wire(True)}


def _ours_request(arrays: dict[str, Any], batch: int) -> Any:
    from hpcai_async import types

    tokens, targets, weights = arrays["tokens"], arrays["targets"], arrays["weights"]
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens[i]),
            loss_fn_inputs={"target_tokens": targets[i], "weights": weights[i]},
        )
        for i in range(batch)
    ]
    return types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"), model_id=MODEL
    )


def _ours_output(batch: int, seq: int) -> Any:
    from hpcai_async import types

    logprobs, loss = make_output_arrays(batch, seq)
    outs = [
        {
            "logprobs": types.TensorData(data=logprobs[i], dtype="float32", shape=[seq]),
            "elementwise_loss": types.TensorData(data=loss[i], dtype="float32", shape=[seq]),
        }
        for i in range(batch)
    ]
    return types.ForwardBackwardOutput(
        loss_fn_output_type="cross_entropy",
        loss_fn_outputs=outs,
        metrics={"loss:mean": 1.0, "num_examples:sum": float(batch), "step:max": 0.0},
    )


def output_body(fmt: str, batch: int = BATCH, seq: int = SEQ) -> bytes:
    """The server's answer body (the local server shares these structs and encoders)."""
    body: bytes = _codecs()[fmt]["encode"](_ours_output(batch, seq))
    return body


def _check_request(fmt: str, body: bytes, arrays: dict[str, Any], batch: int) -> None:
    import numpy as np

    from hpcai_async import types

    req = _codecs()[fmt]["decode"](body, types.ForwardBackwardRequest)
    for i in (0, batch - 1):
        d = req.forward_backward_input.data[i]
        assert np.array_equal(d.model_input.to_numpy(), arrays["tokens"][i]), "tokens differ"
        assert np.array_equal(d.loss_fn_inputs["target_tokens"].to_numpy(), arrays["targets"][i]), "targets"
        w = d.loss_fn_inputs["weights"].to_numpy()
        assert w.dtype == np.float32 and np.array_equal(w, arrays["weights"][i]), "weights differ"


def ours_encode(fmt: str, batch: int = BATCH, seq: int = SEQ, repeat: int = 9) -> dict[str, Any]:
    arrays = make_batch(batch, seq)
    encode = _codecs()[fmt]["encode"]
    body = encode(_ours_request(arrays, batch))
    _check_request(fmt, body, arrays, batch)
    ts = timeit(lambda: encode(_ours_request(arrays, batch)), repeat=repeat, warmup=2)
    return {"ms": median(ts) * 1e3, "bytes": len(body)}


def ours_decode(fmt: str, batch: int = BATCH, seq: int = SEQ, repeat: int = 9) -> dict[str, Any]:
    import numpy as np

    from hpcai_async import types

    body = output_body(fmt, batch, seq)
    decode = _codecs()[fmt]["decode"]
    logprobs, loss = make_output_arrays(batch, seq)

    def run() -> list[Any]:
        out = decode(body, types.ForwardBackwardOutput)
        return [(o["logprobs"].to_numpy(), o["elementwise_loss"].to_numpy()) for o in out.loss_fn_outputs]

    arrs = run()
    assert all(np.array_equal(a, logprobs[i]) and np.array_equal(b, loss[i]) for i, (a, b) in enumerate(arrs))
    assert arrs[0][0].dtype == np.float32
    ts = timeit(run, repeat=repeat, warmup=2)
    return {"ms": median(ts) * 1e3, "bytes": len(body)}


def json_output_file(batch: int = BATCH, seq: int = SEQ, path: str = "") -> dict[str, Any]:
    """Write the JSON output body for the official side to decode (child of ours)."""
    with open(path, "wb") as f:
        f.write(output_body("json", batch, seq))
    return {"path": path}


# --------------------------------------------------------------------------------------------- official


def official_encode(batch: int = BATCH, seq: int = SEQ, repeat: int = 5) -> dict[str, Any]:
    import httpx
    import numpy as np
    from hpcai import types
    from hpcai._utils import maybe_transform
    from hpcai.lib.public_interfaces.training_client import _to_fwdbwd_input_params
    from hpcai.types import training_forward_backward_params

    arrays = make_batch(batch, seq)
    tokens, targets, weights = arrays["tokens"], arrays["targets"], arrays["weights"]

    def encode() -> bytes:
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[i].tolist()),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(targets[i]),
                    "weights": types.TensorData.from_numpy(weights[i]),
                },
            )
            for i in range(batch)
        ]
        fb_input = _to_fwdbwd_input_params(types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"))
        body = maybe_transform(
            {"forward_backward_input": fb_input, "model_id": MODEL},
            training_forward_backward_params.TrainingForwardBackwardParams,
        )
        return httpx.Request("POST", "http://127.0.0.1/api/v1/forward_backward", json=body).content

    body = encode()
    import json

    parsed = json.loads(body)["forward_backward_input"]["data"][0]
    assert np.array_equal(np.asarray(parsed["loss_fn_inputs"]["weights"]["data"], np.float32), weights[0])
    ts = timeit(encode, repeat=repeat, warmup=1)
    return {"ms": median(ts) * 1e3, "bytes": len(body)}


def official_decode(path: str, batch: int = BATCH, seq: int = SEQ, repeat: int = 5) -> dict[str, Any]:
    import json

    import numpy as np
    from hpcai import types
    from hpcai.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results

    with open(path, "rb") as f:
        body = f.read()
    logprobs, loss = make_output_arrays(batch, seq)

    def run() -> list[Any]:
        result = types.ForwardBackwardOutput.model_validate(json.loads(body))
        out = combine_fwd_bwd_output_results([result])
        return [(o["logprobs"].to_numpy(), o["elementwise_loss"].to_numpy()) for o in out.loss_fn_outputs]

    arrs = run()
    assert all(np.array_equal(a, logprobs[i]) and np.array_equal(b, loss[i]) for i, (a, b) in enumerate(arrs))
    ts = timeit(run, repeat=repeat, warmup=1)
    return {"ms": median(ts) * 1e3, "bytes": len(body)}


# --------------------------------------------------------------------------------------------- floor


def plain_encode(batch: int = BATCH, seq: int = SEQ, repeat: int = 9) -> dict[str, Any]:
    """The floor for encoding: plain msgspec structs from the same numpy arrays (``tolist``), then JSON."""
    import msgspec

    from bench._plain import Chunk, Datum, FBInput, FBRequest, Input, IntTensor, Tensor

    arrays = make_batch(batch, seq)
    tokens, targets, weights = arrays["tokens"], arrays["targets"], arrays["weights"]
    encoder = msgspec.json.Encoder()

    def encode() -> bytes:
        data = [
            Datum(
                loss_fn_inputs={
                    "target_tokens": IntTensor(targets[i].tolist(), "int64", [seq]),
                    "weights": Tensor(weights[i].tolist(), "float32", [seq]),
                },
                model_input=Input([Chunk(tokens[i].tolist())]),
            )
            for i in range(batch)
        ]
        return encoder.encode(FBRequest(FBInput(data, "cross_entropy"), MODEL))

    body = encode()
    _check_request("json", body, arrays, batch)
    ts = timeit(encode, repeat=repeat, warmup=2)
    return {"ms": median(ts) * 1e3, "bytes": len(body)}


def plain_decode(batch: int = BATCH, seq: int = SEQ, repeat: int = 9) -> dict[str, Any]:
    """The floor for decoding: the same JSON body into plain msgspec structs, then ``np.array`` per tensor."""
    import msgspec
    import numpy as np

    from bench._plain import FBOutput

    body = output_body("json", batch, seq)
    decoder = msgspec.json.Decoder(FBOutput)
    logprobs, loss = make_output_arrays(batch, seq)

    def run() -> list[Any]:
        out = decoder.decode(body)
        return [
            (np.array(o["logprobs"].data, np.float32), np.array(o["elementwise_loss"].data, np.float32))
            for o in out.loss_fn_outputs
        ]

    arrs = run()
    assert all(np.array_equal(a, logprobs[i]) and np.array_equal(b, loss[i]) for i, (a, b) in enumerate(arrs))
    ts = timeit(run, repeat=repeat, warmup=2)
    return {"ms": median(ts) * 1e3, "bytes": len(body)}


# --------------------------------------------------------------------------------------------- tinker


def tinker_encode(batch: int = BATCH, seq: int = SEQ, repeat: int = 9) -> dict[str, Any]:
    """tinker 0.38's send path for the same request: its types from numpy, then protobuf bytes.

    What ``TrainingClient.forward_backward`` and ``AsyncTrainingResource.forward_backward`` do per chunk
    (``tinker/lib/public_interfaces/training_client.py``, ``tinker/resources/training.py``): ``Datum`` with
    ``ModelInput.from_ints`` and ``TensorData.from_numpy``, ``ForwardBackwardRequest``, then
    ``forward_backward_request_to_proto(...).SerializeToString()`` (zstd is off by default:
    ``proto_compress_fwdbwd = False``).
    """
    import numpy as np
    from tinker import types
    from tinker.proto import tinker_public_pb2 as pb
    from tinker.proto.request_conv import forward_backward_request_to_proto

    arrays = make_batch(batch, seq)
    tokens, targets, weights = arrays["tokens"], arrays["targets"], arrays["weights"]

    def encode() -> bytes:
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[i].tolist()),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(targets[i]),
                    "weights": types.TensorData.from_numpy(weights[i]),
                },
            )
            for i in range(batch)
        ]
        request = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
            model_id=MODEL,
            seq_id=1,
        )
        body: bytes = forward_backward_request_to_proto(request).SerializeToString()
        return body

    body = encode()
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(body)
    last = msg.data[batch - 1]
    assert np.array_equal(np.frombuffer(last.loss_fn_inputs["weights"].dense, np.float32), weights[-1])
    # tinker packs token ids as int32: exact for every Qwen3 id (< 2**31)
    assert np.array_equal(np.frombuffer(last.model_input[0].encoded_text.tokens, np.int32), tokens[-1])
    ts = timeit(encode, repeat=repeat, warmup=2)
    return {"ms": median(ts) * 1e3, "bytes": len(body)}


def tinker_output_body(batch: int, seq: int) -> bytes:
    """The output as a tinker 0.38 server sends it: one ArrayRecord of BatchedTensors (float32 bytes)."""
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.ForwardBackwardOutput(loss_fn_output_type="cross_entropy")
    msg.metrics["loss:mean"] = 1.0
    record = msg.loss_fn_outputs.add(num_datums=batch)
    offsets = (np.arange(batch + 1, dtype=np.int64) * seq * 4).tobytes()
    for name, arr in zip(("logprobs", "elementwise_loss"), make_output_arrays(batch, seq), strict=True):
        field = record.fields[name]
        field.data, field.offsets, field.dtype = arr.tobytes(), offsets, pb.DTYPE_FLOAT32
    body: bytes = msg.SerializeToString()
    return body


def tinker_decode(batch: int = BATCH, seq: int = SEQ, repeat: int = 9) -> dict[str, Any]:
    """tinker 0.38's receive path: ``deserialize_forward_backward_output`` (what ``api_future_impl`` calls on
    a protobuf answer), ``combine_fwd_bwd_output_results``, then ``TensorData.to_numpy()``."""
    import numpy as np
    from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results
    from tinker.proto.response_conv import deserialize_forward_backward_output

    body = tinker_output_body(batch, seq)
    logprobs, loss = make_output_arrays(batch, seq)

    def run() -> list[Any]:
        out = combine_fwd_bwd_output_results([deserialize_forward_backward_output(body)])
        return [(o["logprobs"].to_numpy(), o["elementwise_loss"].to_numpy()) for o in out.loss_fn_outputs]

    arrs = run()
    assert all(np.array_equal(a, logprobs[i]) and np.array_equal(b, loss[i]) for i, (a, b) in enumerate(arrs))
    ts = timeit(run, repeat=repeat, warmup=2)
    return {"ms": median(ts) * 1e3, "bytes": len(body)}


# --------------------------------------------------------------------------------------------- table


def _measure(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every side's encode and decode figures, each from a fresh interpreter."""
    import tempfile

    from bench import _tinker

    got = {
        "ours_encode_json": _official.run_ours("codec", "ours_encode", {"fmt": "json", **cfg}),
        "ours_encode_msgpack": _official.run_ours("codec", "ours_encode", {"fmt": "msgpack", **cfg}),
        "ours_decode_json": _official.run_ours("codec", "ours_decode", {"fmt": "json", **cfg}),
        "ours_decode_msgpack": _official.run_ours("codec", "ours_decode", {"fmt": "msgpack", **cfg}),
        "plain_encode": _official.run_ours("codec", "plain_encode", cfg),
        "plain_decode": _official.run_ours("codec", "plain_decode", cfg),
        "official_encode": _official.run("codec", "official_encode", cfg),
        "tinker_encode": _tinker.run("codec", "tinker_encode", cfg),
        "tinker_decode": _tinker.run("codec", "tinker_decode", cfg),
    }
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        size = {k: v for k, v in cfg.items() if k != "repeat"}
        made = _official.run_ours("codec", "json_output_file", {**size, "path": tmp.name})
        got["official_decode"] = (
            made if "error" in made else _official.run("codec", "official_decode", {**cfg, "path": tmp.name})
        )
    return got


def _mb(r: dict[str, Any]) -> str:
    return f"{r['bytes'] / 1e6:.2f} MB" if "bytes" in r else "?"


def run(quick: bool = False) -> list[dict[str, Any]]:
    cfg: dict[str, Any] = {"batch": 8, "seq": 256, "repeat": 3} if quick else {}
    size = "8x256" if quick else f"{BATCH}x{SEQ}"
    m = _measure(cfg)
    rows = []
    for op, what in (
        ("encode", f"encode fwd_bwd request {size}"),
        ("decode", f"decode fwd_bwd output {size}"),
    ):
        hosted, local = m[f"ours_{op}_json"], m[f"ours_{op}_msgpack"]
        official, plain, tinker = m[f"official_{op}"], m[f"plain_{op}"], m[f"tinker_{op}"]
        notes = errors(ours_JSON=hosted, ours_MessagePack=local, official=official, plain_msgspec=plain)
        notes.append(
            f"hosted = JSON, local = MessagePack; floor = plain msgspec structs of lists, same JSON; "
            f"bodies: JSON {_mb(hosted)}, MessagePack {_mb(local)}, official JSON {_mb(official)}"
        )
        x, local_x = TARGETS[f"{op}_json"], TARGETS[f"{op}_msgpack"]
        r = row(
            f"{what} (hosted codec: JSON)",
            "ms",
            hosted.get("ms"),
            official.get("ms"),
            f"≥ {x:.0f}x official, ≤ 2x plain msgspec (floor ≥ 0.5x); local ≥ {local_x:.0f}x official",
            None,
            note="; ".join(notes),
            local=local.get("ms"),
            floor=plain.get("ms"),
        )
        r["ok"] = meets(r, x, TARGET_OF_PLAIN, local_x)
        rows.append(r)
        notes = errors(ours=hosted, tinker=tinker)
        notes.append(
            f"official column = tinker {TINKER} protobuf ({_mb(tinker)}: int32 tokens, raw float bytes); "
            f"ours hosted = JSON, local = MessagePack; no target: the best-funded peer's codec for scale"
        )
        rows.append(
            row(
                f"{what}: vs tinker {TINKER} protobuf",
                "ms",
                hosted.get("ms"),
                tinker.get("ms"),
                "—",
                None,
                note="; ".join(notes),
                local=local.get("ms"),
            )
        )
    return rows


if __name__ == "__main__":
    report("encode / decode", run())
