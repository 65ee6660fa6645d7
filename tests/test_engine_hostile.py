"""Hostile numbers and bodies through a real LocalServer: typed 400s naming the field, and refused steps.

Two halves. The input rules of ``engine_api`` (token ids are integers, ids fit int64 and the vocabulary,
seeds in range, enum fields list their values) run on the ``NullEngine`` server, since the rules are the
same for every engine. The finiteness guard runs on the real engine: a forward_backward or optim_step that
would leave a weight, a gradient or an Adam moment NaN or infinite is refused, and the run's state is bit for
bit what it was -- checked on the engine's own tensors, and by training on afterwards and comparing with a
run that never saw the bad request.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import msgspec
import numpy as np
import pytest

from hpcai_async.server import NULL_MODEL, LocalServer
from hpcai_async.server.models import BUILTIN_NAME

# ------------------------------------------------------------------------------------------------ helpers


def post(srv: LocalServer, path: str, body: Any, *, msgpack: bool = False) -> tuple[int, Any]:
    """One raw JSON (or MessagePack) request: no client library, the server's own status and JSON answer."""
    data = msgspec.msgpack.encode(body) if msgpack else json.dumps(body).encode()
    kind = "application/msgpack" if msgpack else "application/json"
    headers = {"X-API-Key": srv.api_key, "Content-Type": kind, "Accept": "application/json"}
    req = urllib.request.Request(f"{srv.url}/api/v1/{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def call(srv: LocalServer, path: str, body: Any, *, msgpack: bool = False) -> tuple[int, Any]:
    """Submit, then poll the future to its end: (status, body) of the submit if it failed, else the result."""
    status, out = post(srv, path, body, msgpack=msgpack)
    if status != 200 or "request_id" not in out:
        return status, out
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, res = post(srv, "retrieve_future", {"request_id": out["request_id"]})
        if res.get("type") != "try_again":
            return status, res
    raise AssertionError(f"no result for {path}")


def create(srv: LocalServer, base_model: str, **lora: Any) -> str:
    status, out = call(srv, "create_model", {"base_model": base_model, "lora_config": {"rank": 4, **lora}})
    assert status == 200 and "model_id" in out, out
    return str(out["model_id"])


def datum(tokens: Any = (1, 2, 3), **inputs: Any) -> dict[str, Any]:
    """A cross_entropy datum; ``inputs`` replace loss_fn_inputs entries (a list = float32 data)."""
    loss_inputs: dict[str, Any] = {
        "target_tokens": {"data": [2, 3, 4], "dtype": "int64"},
        "weights": {"data": [1.0, 1.0, 1.0], "dtype": "float32"},
    }
    for key, value in inputs.items():
        loss_inputs[key] = value if isinstance(value, dict) else {"data": value, "dtype": "float32"}
    tokens = list(tokens) if isinstance(tokens, tuple) else tokens
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": loss_inputs,
    }


def fb(model_id: str, data: list[dict[str, Any]], loss_fn: str = "cross_entropy") -> dict[str, Any]:
    return {"model_id": model_id, "forward_backward_input": {"loss_fn": loss_fn, "data": data}}


def sample(base_model: str, tokens: Any = (1, 2), **params: Any) -> dict[str, Any]:
    tokens = list(tokens) if isinstance(tokens, tuple) else tokens
    return {
        "base_model": base_model,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "sampling_params": {"max_tokens": 2, **params},
    }


def targets(data: Any) -> dict[str, Any]:
    return {"target_tokens": {"data": data, "dtype": "int64"}}


# --------------------------------------------------------------------------------------- input rules

TOKENS = "forward_backward_input.data[0].model_input.chunks[0].tokens"
TARGETS = "forward_backward_input.data[0].loss_fn_inputs.target_tokens"
WEIGHTS = "forward_backward_input.data[0].loss_fn_inputs.weights"

# (name, route, body(model_id), text the message must contain)
CASES: list[tuple[str, str, Any, str]] = [
    (
        "token 1.5",
        "forward_backward",
        lambda m: fb(m, [datum([1, 1.5, 2])]),
        f"{TOKENS}: values must be integers",
    ),
    (
        "token '5'",
        "forward_backward",
        lambda m: fb(m, [datum([1, "5", 2])]),
        f"{TOKENS}: values must be integers",
    ),
    (
        "token true",
        "forward_backward",
        lambda m: fb(m, [datum([1, True, 2])]),
        f"{TOKENS}: values must be integers",
    ),
    (
        "token null",
        "forward_backward",
        lambda m: fb(m, [datum([1, None, 2])]),
        f"{TOKENS}: values must be integers",
    ),
    ("token scalar", "forward_backward", lambda m: fb(m, [datum(5)]), f"{TOKENS}: must be a flat list"),
    ("token nested", "forward_backward", lambda m: fb(m, [datum([[1, 2, 3]])]), f"{TOKENS}: values must be"),
    (
        "token 10**30",
        "forward_backward",
        lambda m: fb(m, [datum([1, 10**30, 2])]),
        f"{TOKENS}: a value is outside",
    ),
    (
        "token 2**63",
        "forward_backward",
        lambda m: fb(m, [datum([1, 2**63, 2])]),
        f"{TOKENS}: a value is outside",
    ),
    (
        "token -1",
        "forward_backward",
        lambda m: fb(m, [datum([1, -1, 2])]),
        f"{TOKENS}: token id -1 is outside",
    ),
    (
        "token vocab",
        "forward_backward",
        lambda m: fb(m, [datum([1, 1 << 20, 2])]),
        f"{TOKENS}: token id 1048576",
    ),
    (
        "target 1.5",
        "forward_backward",
        lambda m: fb(m, [datum(**targets([2, 3.5, 4]))]),
        f"{TARGETS}: values must",
    ),
    (
        "target '3'",
        "forward_backward",
        lambda m: fb(m, [datum(**targets([2, "3", 4]))]),
        f"{TARGETS}: values must",
    ),
    (
        "target true",
        "forward_backward",
        lambda m: fb(m, [datum(**targets([2, True, 4]))]),
        f"{TARGETS}: values",
    ),
    (
        "target scalar",
        "forward_backward",
        lambda m: fb(m, [datum(**targets(3))]),
        f"{TARGETS}: must be a flat",
    ),
    (
        "target nested",
        "forward_backward",
        lambda m: fb(m, [datum(**targets([[2, 3, 4]]))]),
        f"{TARGETS}: values",
    ),
    (
        "target 2**63",
        "forward_backward",
        lambda m: fb(m, [datum(**targets([2, 2**63, 4]))]),
        f"{TARGETS}: a value",
    ),
    (
        "target 10**30",
        "forward_backward",
        lambda m: fb(m, [datum(**targets([2, 10**30, 4]))]),
        f"{TARGETS}: a val",
    ),
    (
        "weight '1'",
        "forward_backward",
        lambda m: fb(m, [datum(weights=[1.0, "1", 1.0])]),
        f"{WEIGHTS}: values must",
    ),
    (
        "weight true",
        "forward_backward",
        lambda m: fb(m, [datum(weights=[1.0, True, 1.0])]),
        f"{WEIGHTS}: values",
    ),
    (
        "weight 1e39",
        "forward_backward",
        lambda m: fb(m, [datum(weights=[1.0, 1e39, 1.0])]),
        f"{WEIGHTS}: a value",
    ),
    (
        "unknown loss_fn",
        "forward_backward",
        lambda m: fb(m, [datum()], loss_fn="nope"),
        "loss_fn: invalid enum value 'nope'; use one of cross_entropy, importance_sampling, ppo",
    ),
    (
        "unknown dtype",
        "forward_backward",
        lambda m: fb(m, [datum(weights={"data": [1.0] * 3, "dtype": "float64"})]),
        "dtype: invalid enum value 'float64'; use one of int64, float32",
    ),
    (
        "unknown chunk type",
        "forward_backward",
        lambda m: fb(m, [{**datum(), "model_input": {"chunks": [{"type": "image", "tokens": [1]}]}}]),
        "chunks[0].type: invalid value 'image'; use one of encoded_text, image_asset_pointer",
    ),
    ("prompt 1.5", "asample", lambda m: sample(NULL_MODEL, [1, 1.5]), "prompt.chunks[0].tokens: values must"),
    ("prompt 2**63", "asample", lambda m: sample(NULL_MODEL, [2**63]), "prompt.chunks[0].tokens: a value is"),
    (
        "prompt 10**30",
        "asample",
        lambda m: sample(NULL_MODEL, [10**30]),
        "prompt.chunks[0].tokens: a value is",
    ),
    ("seed -1", "asample", lambda m: sample(NULL_MODEL, seed=-1), "sampling_params.seed: must be an integer"),
    (
        "seed 2**64",
        "asample",
        lambda m: sample(NULL_MODEL, seed=2**64),
        "sampling_params.seed: must be an integer",
    ),
    ("top_k 0", "asample", lambda m: sample(NULL_MODEL, top_k=0), "sampling_params.top_k: must be -1"),
    ("stop mix", "asample", lambda m: sample(NULL_MODEL, stop=["a", 1]), "sampling_params.stop: give a list"),
    (
        "num_samples 257",
        "asample",
        lambda m: {**sample(NULL_MODEL), "num_samples": 257},
        "num_samples: must be in",
    ),
    (
        "lora seed -1",
        "create_model",
        lambda m: {"base_model": NULL_MODEL, "lora_config": {"rank": 4, "seed": -1}},
        "lora_config.seed: must be an integer",
    ),
    (
        "adam lr -1",
        "optim_step",
        lambda m: {"model_id": m, "adam_params": {"learning_rate": -1}},
        "learning_rate",
    ),
    (
        "adam beta1 1",
        "optim_step",
        lambda m: {"model_id": m, "adam_params": {"beta1": 1.0}},
        "adam_params.beta1",
    ),
]


@pytest.mark.parametrize(("route", "body", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_values_are_a_400_at_submit_naming_the_field(
    null_server: LocalServer, route: str, body: Any, expect: str
) -> None:
    model_id = create(null_server, NULL_MODEL, seed=0)
    status, out = post(null_server, route, body(model_id))
    assert status == 400, out  # at submit time: no future to wait for
    assert out["error"] == "BadRequestError" and expect in out["message"], out["message"]
    assert len(out["message"]) < 600  # quotes the value, not the body
    # nothing changed: the model has run no step, and a good request still works
    status, res = call(null_server, "forward_backward", fb(model_id, [datum()]))
    assert status == 200 and res["metrics"]["step:max"] == 0.0, res


def test_raw_tensor_bytes_are_checked_too(null_server: LocalServer) -> None:
    """MessagePack carries tensors as raw little-endian bytes: the same rules, on the bytes."""
    model_id = create(null_server, NULL_MODEL, seed=0)
    nan = np.array([1.0, np.nan, 1.0], "<f4").tobytes()
    cases = [
        (datum(b"\x01" * 7), f"{TOKENS}: 7 bytes is not a whole number of int64 values"),
        (datum(np.array([1, -5, 2], "<i8").tobytes()), f"{TOKENS}: token id -5 is outside"),
        (datum(weights={"data": nan, "dtype": "float32"}), f"{WEIGHTS}: values must be finite"),
        (datum(**targets(np.array([2, 3], "<i8").tobytes())), f"{TARGETS}: 2 values, but model_input has 3"),
    ]
    for bad, expect in cases:
        status, out = post(null_server, "forward_backward", fb(model_id, [bad]), msgpack=True)
        assert status == 400 and expect in out["message"], out
    good = fb(model_id, [datum(np.array([1, 2, 3], "<i8").tobytes())])
    status, out = call(null_server, "forward_backward", good, msgpack=True)
    assert status == 200 and out["metrics"]["step:max"] == 0.0, out


def test_vocabulary_of_the_real_model_is_checked(server: LocalServer) -> None:
    from hpcai_async.server.models import resolve_model

    vocab = resolve_model(BUILTIN_NAME).vocab_size
    model_id = create(server, BUILTIN_NAME, seed=0)
    status, out = post(server, "forward_backward", fb(model_id, [datum([1, vocab, 2])]))
    assert status == 400 and f"{TOKENS}: token id {vocab} is outside the model's vocabulary" in out["message"]
    status, out = post(server, "forward_backward", fb(model_id, [datum(**targets([2, vocab + 5, 4]))]))
    assert status == 400 and f"{TARGETS}: token id {vocab + 5}" in out["message"], out
    status, out = post(server, "asample", sample(BUILTIN_NAME, [vocab]))
    assert status == 400 and "prompt.chunks[0].tokens: token id" in out["message"], out


def test_the_loss_registry_is_the_wire_list() -> None:
    from typing import get_args

    from hpcai_async import types
    from hpcai_async.server.engine.losses import LOSSES

    assert tuple(LOSSES) == get_args(types.LossFnType)


# -------------------------------------------------------------------------------------- finiteness guard

RL = {"target_tokens": {"data": [2, 3, 4], "dtype": "int64"}}


def rl_datum(logprobs: list[float], advantages: list[float]) -> dict[str, Any]:
    base = datum()
    base["loss_fn_inputs"] = {
        **RL,
        "logprobs": {"data": logprobs, "dtype": "float32"},
        "advantages": {"data": advantages, "dtype": "float32"},
    }
    return base


def state(engine: Any, model_id: str) -> dict[str, Any]:
    """Everything a step may change, copied: weights, gradients, Adam state, counters."""
    run = engine._runs[model_id]
    out: dict[str, Any] = {"steps": run.steps, "loss_sum": run.loss_sum, "weight_sum": run.weight_sum}
    if run.optimizer is not None:
        out["settings"] = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    for key, p in run.params:
        out[key] = p.detach().clone()
        out[f"{key}.grad"] = None if p.grad is None else p.grad.clone()
        s = run.optimizer.state.get(p) if run.optimizer is not None else None
        for k, v in (s or {}).items():
            out[f"{key}.{k}"] = v.clone()
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key  # bit for bit (NaN != NaN fails too)
        else:
            assert value == b[key], key


GOOD_ADAM = {"learning_rate": 1e-2, "weight_decay": 0.01}
BAD_FB = {
    "cross_entropy weights 1e38": ("cross_entropy", datum(weights=[1e38, 1e38, 1e38]), "weights"),
    "importance_sampling logprobs -1e30": (
        "importance_sampling",
        rl_datum([-1e30, -1.0, -1.0], [1.0, 1.0, 1.0]),
        "logprobs, advantages",
    ),
    "ppo advantages 3e38": ("ppo", rl_datum([-1.0, -1.0, -1.0], [3e38, 3e38, 3e38]), "logprobs, advantages"),
}


@pytest.mark.parametrize("case", list(BAD_FB))
def test_forward_backward_that_would_go_non_finite_is_refused(
    server: LocalServer, real_engine: Any, case: str
) -> None:
    loss_fn, bad, names = BAD_FB[case]
    seen, fresh = create(server, BUILTIN_NAME, seed=3), create(server, BUILTIN_NAME, seed=3)
    for model_id in (seen, fresh):  # optimizer state and pending gradients exist before the bad request
        assert call(server, "forward_backward", fb(model_id, [datum()]))[0] == 200
        assert call(server, "optim_step", {"model_id": model_id, "adam_params": GOOD_ADAM})[0] == 200
        assert call(server, "forward_backward", fb(model_id, [datum()]))[0] == 200
    before = state(real_engine, seen)
    _, out = call(server, "forward_backward", fb(seen, [bad], loss_fn))
    assert out.get("error") == "BadRequestError", out
    assert "forward_backward refused" in out["message"] and f"({names})" in out["message"], out
    assert "Nothing was applied" in out["message"]
    assert_same(before, state(real_engine, seen))
    for model_id in (seen, fresh):  # the refused request left no trace: training goes on as on a fresh run
        assert call(server, "optim_step", {"model_id": model_id, "adam_params": GOOD_ADAM})[0] == 200
    assert_same(state(real_engine, seen), state(real_engine, fresh))


@pytest.mark.parametrize("adam", [{"learning_rate": 1e30}, {"learning_rate": 1e25, "weight_decay": 1e20}])
def test_optim_step_that_would_go_non_finite_is_refused(
    server: LocalServer, real_engine: Any, adam: dict[str, float]
) -> None:
    seen, fresh = create(server, BUILTIN_NAME, seed=5), create(server, BUILTIN_NAME, seed=5)
    for model_id in (seen, fresh):
        assert call(server, "forward_backward", fb(model_id, [datum()]))[0] == 200
        assert call(server, "optim_step", {"model_id": model_id, "adam_params": GOOD_ADAM})[0] == 200
        assert call(server, "forward_backward", fb(model_id, [datum()]))[0] == 200
    before = state(real_engine, seen)
    _, out = call(server, "optim_step", {"model_id": seen, "adam_params": adam})
    assert out.get("error") == "BadRequestError", out
    assert "optim_step refused" in out["message"] and "learning_rate" in out["message"], out
    assert_same(before, state(real_engine, seen))
    for model_id in (seen, fresh):
        status, res = call(server, "optim_step", {"model_id": model_id, "adam_params": GOOD_ADAM})
        assert status == 200 and res["metrics"]["step:max"] == 2.0, res
    assert_same(state(real_engine, seen), state(real_engine, fresh))


def test_first_optim_step_refused_leaves_no_optimizer(server: LocalServer, real_engine: Any) -> None:
    model_id = create(server, BUILTIN_NAME, seed=1)
    assert call(server, "forward_backward", fb(model_id, [datum()]))[0] == 200
    before = state(real_engine, model_id)
    _, out = call(server, "optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e30}})
    assert "optim_step refused" in out.get("message", ""), out
    assert real_engine._runs[model_id].optimizer is None
    assert_same(before, state(real_engine, model_id))
