"""Encoding a forward_backward request and decoding its output, from and to numpy: no network, no server.

Request: 64 datums x 2048 tokens (token ids drawn from a 151,936-token vocabulary, int64 targets, 0/1
float32 weights with the prompt quarter masked), built from numpy arrays, up to the request body bytes.

- ours: ``types.Datum`` / ``ForwardBackwardRequest`` from the arrays, then the client's own encoder
  (``hpcai_async._http``) — JSON (hosted service) or MessagePack with raw tensor bytes (our server).
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
from bench._common import BATCH, MODEL, SEQ, make_batch, make_output_arrays, median, report, row, timeit

TARGETS = {"encode_json": 15.0, "encode_msgpack": 80.0, "decode_json": 10.0, "decode_msgpack": 200.0}


# --------------------------------------------------------------------------------------------- ours


def _codecs() -> dict[str, Any]:
    """The encoders/decoders the client really uses (hpcai_async._wire), keyed by wire format."""
    from hpcai_async import _wire

    def codec(msgpack: bool) -> dict[str, Any]:
        return {
            "encode": lambda body: _wire.encode(body, msgpack)[0],
            "decode": lambda body, tp: _wire.decoder(tp, msgpack).decode(body),
        }

    return {"json": codec(False), "msgpack": codec(True)}


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


# --------------------------------------------------------------------------------------------- table


def run(quick: bool = False) -> list[dict[str, Any]]:
    import tempfile

    cfg: dict[str, Any] = {"batch": 8, "seq": 256, "repeat": 3} if quick else {}
    ours = {
        "encode_json": _official.run_ours("codec", "ours_encode", {"fmt": "json", **cfg}),
        "encode_msgpack": _official.run_ours("codec", "ours_encode", {"fmt": "msgpack", **cfg}),
        "decode_json": _official.run_ours("codec", "ours_decode", {"fmt": "json", **cfg}),
        "decode_msgpack": _official.run_ours("codec", "ours_decode", {"fmt": "msgpack", **cfg}),
    }
    off_enc = _official.run("codec", "official_encode", cfg)
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        size = {k: v for k, v in cfg.items() if k != "repeat"}
        made = _official.run_ours("codec", "json_output_file", {**size, "path": tmp.name})
        off_dec = (
            made if "error" in made else _official.run("codec", "official_decode", {**cfg, "path": tmp.name})
        )
    official = {
        "encode_json": off_enc,
        "encode_msgpack": off_enc,
        "decode_json": off_dec,
        "decode_msgpack": off_dec,
    }
    labels = {
        "encode_json": "encode fwd_bwd request 64x2048, JSON",
        "encode_msgpack": "encode fwd_bwd request 64x2048, MessagePack",
        "decode_json": "decode fwd_bwd output 64x2048, JSON",
        "decode_msgpack": "decode fwd_bwd output 64x2048, MessagePack",
    }
    rows = []
    for key, label in labels.items():
        o, f = ours[key], official[key]
        notes = [f"{side}: {r['error']}" for side, r in (("ours", o), ("official", f)) if "error" in r]
        if "bytes" in o:
            notes.append(f"body {o['bytes'] / 1e6:.2f} MB vs official JSON {f.get('bytes', 0) / 1e6:.2f} MB")
        r = row(
            label if not quick else label.replace("64x2048", "8x256"),
            "ms",
            o.get("ms"),
            f.get("ms"),
            f"≥ {TARGETS[key]:.0f}x faster than official JSON",
            None,
            note="; ".join(notes),
        )
        r["ok"] = None if r["ratio"] is None else r["ratio"] >= TARGETS[key]
        rows.append(r)
    return rows


if __name__ == "__main__":
    report("encode / decode", run())
