"""Hostile input, one table: each case is a typed 4xx naming the field, changes nothing, and the server lives.

Each row sends one bad request to a real ``LocalServer`` over 127.0.0.1 -- at the HTTP level (encodings,
headers, sizes, deadlines) or in the body (ids, types, enums, ranges, extreme finite numbers) -- and asserts:

* the status (of the answer, or of the job's error when the request was accepted and refused while it ran);
* that the message names the field (or header) and stays short, whatever size of value it quotes;
* that nothing changed on the server: the model's step count and forward output, its next seq_id, its
  checkpoint listing and the number of runs are what they were before;
* that the server is still healthy (``healthz``, and the model answers a forward).

Most rows run on ``NullEngine`` (the input rules are the same for every engine); the extreme-value rows run
on the real engine, where a refused step must leave the weights exactly as they were (the forward logprobs
of a fixed datum, compared exactly).
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from hpcai_async import _wire
from hpcai_async.server import NULL_MODEL, LocalServer, NullEngine
from hpcai_async.server.models import BUILTIN_NAME

LIMIT = 1 << 20  # the test server's body limit (1 MiB), so size cases stay quick
DEADLINE = 0.5  # s: the test server's head and body deadlines
MESSAGE_MAX = 1200  # characters an error message may have (the server cuts at 1000; some slack for JSON)

# ------------------------------------------------------------------------------------------------ the wire


@dataclasses.dataclass
class Answer:
    status: int | None  # None: the server closed the connection without an answer
    body: Any = None
    raw: bytes = b""

    @property
    def message(self) -> str:
        return str(self.body.get("message", "")) if isinstance(self.body, dict) else ""


def exchange(
    srv: LocalServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, Any] | None = None,
    key: bool = True,
) -> Answer:
    """One HTTP request on its own connection (http.client: header values may be raw bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest(method, f"/api/v1/{path}", skip_accept_encoding=True)
        sent = {"Content-Type": "application/json", **({"X-API-Key": srv.api_key} if key else {})}
        for name, value in {**sent, **(headers or {})}.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    parsed: Any = None
    if raw:
        ctype = resp.getheader("Content-Type", "")
        decode = msgspec.msgpack.decode if _wire.is_msgpack(ctype.split(";")[0]) else msgspec.json.decode
        try:
            parsed = decode(raw)
        except msgspec.DecodeError:
            parsed = raw.decode("utf-8", "replace")
    return Answer(resp.status, parsed, raw)


def post(srv: LocalServer, path: str, body: Any) -> Answer:
    return exchange(srv, "POST", path, json.dumps(body).encode())


def outcome(srv: LocalServer, answer: Answer) -> Answer:
    """A submit's final word: its own error, or its job's result (an error there has its class's status)."""
    if answer.status != 200 or not isinstance(answer.body, dict) or "request_id" not in answer.body:
        return answer
    if isinstance(answer.body.get("result"), dict):  # "inline_result"
        result = answer.body["result"]
    else:
        deadline = time.monotonic() + 30
        while True:
            result = post(srv, "retrieve_future", {"request_id": answer.body["request_id"]}).body
            if result.get("type") != "try_again":
                break
            assert time.monotonic() < deadline, "no result"
    if "error" in result:
        return Answer(_wire.status_for_error(result["error"]), result)
    return Answer(200, result)


def call(srv: LocalServer, path: str, body: Any) -> Any:
    out = outcome(srv, post(srv, path, body))
    assert out.status == 200, (path, out)
    return out.body


def raw_socket(srv: LocalServer, data: bytes, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data`` and never anything more: what comes back, and whether the server closed the socket."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            return got, False
    return got, True


# ------------------------------------------------------------------------------------------------ bodies


def chunk(tokens: Any) -> dict[str, Any]:
    return {"type": "encoded_text", "tokens": tokens}


def datum(tokens: Any = (1, 2, 3), **inputs: Any) -> dict[str, Any]:
    """A cross_entropy datum; ``inputs`` replace loss_fn_inputs entries (a list = float32 data)."""
    loss_inputs: dict[str, Any] = {
        "target_tokens": {"data": [2, 3, 4], "dtype": "int64", "shape": [3]},
        "weights": {"data": [1.0, 1.0, 1.0], "dtype": "float32", "shape": [3]},
    }
    for key, value in inputs.items():
        loss_inputs[key] = value if isinstance(value, dict) else {"data": value, "dtype": "float32"}
    return {
        "model_input": {"chunks": [chunk(list(tokens) if isinstance(tokens, tuple) else tokens)]},
        "loss_fn_inputs": loss_inputs,
    }


def rl_datum(logprobs: list[float], advantages: list[float]) -> dict[str, Any]:
    return datum(logprobs=logprobs, advantages=advantages)


def fb(model_id: str, data: Any = None, loss_fn: str = "cross_entropy", **extra: Any) -> dict[str, Any]:
    data = [datum()] if data is None else data
    return {"model_id": model_id, "forward_backward_input": {"loss_fn": loss_fn, "data": data}, **extra}


def fwd(model_id: str, data: Any = None, loss_fn: str = "cross_entropy") -> dict[str, Any]:
    data = [datum()] if data is None else data
    return {"model_id": model_id, "forward_input": {"loss_fn": loss_fn, "data": data}}


def sample(base_model: str = NULL_MODEL, tokens: Any = (1, 2), **params: Any) -> dict[str, Any]:
    tokens = list(tokens) if isinstance(tokens, tuple) else tokens
    return {
        "base_model": base_model,
        "prompt": {"chunks": [chunk(tokens)]},
        "num_samples": 1,
        "sampling_params": {"max_tokens": 2, **params},
    }


def adam(model_id: str, **params: Any) -> dict[str, Any]:
    return {"model_id": model_id, "adam_params": {"learning_rate": 1e-3, **params}}


def lora(**config: Any) -> dict[str, Any]:
    return {"base_model": NULL_MODEL, "lora_config": {"rank": 4, **config}}


# ------------------------------------------------------------------------------------------------ the state


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a case's body may refer to: the test model, one of its checkpoints, its next seq_id."""

    srv: LocalServer
    model_id: str
    checkpoint: str  # a training checkpoint's path
    sampler: str  # a sampler checkpoint's path
    next_seq: int


def snapshot(ctx: Ctx) -> dict[str, Any]:
    """Everything a bad request must leave as it was, and proof that the server still answers."""
    srv, model_id = ctx.srv, ctx.model_id
    assert exchange(srv, "GET", "healthz", key=False).status == 200
    forward = call(srv, "forward", fwd(model_id))
    info = post(srv, "get_info", {"model_id": model_id})
    checkpoints = exchange(srv, "GET", f"training_runs/{model_id}/checkpoints")
    runs = exchange(srv, "GET", "training_runs?limit=1")
    assert info.status == checkpoints.status == runs.status == 200
    return {
        "steps": forward["metrics"].get("step:max"),
        "logprobs": [o["logprobs"]["data"] for o in forward["loss_fn_outputs"]],
        "next_seq_id": info.body.get("next_seq_id"),
        "checkpoints": sorted(c["checkpoint_id"] for c in checkpoints.body["checkpoints"]),
        "runs": runs.body["cursor"]["total_count"],
    }


def open_run(srv: LocalServer, base_model: str) -> Ctx:
    """A model with one optimizer step, one checkpoint and pending gradients (so a bad step could hurt)."""
    model_id = call(srv, "create_model", {**lora(), "base_model": base_model})["model_id"]
    call(srv, "forward_backward", fb(model_id))
    call(srv, "optim_step", adam(model_id))
    path = call(srv, "save_weights", {"model_id": model_id, "path": "kept"})["path"]
    sampler = call(srv, "save_weights_for_sampler", {"model_id": model_id, "path": "kept"})["path"]
    call(srv, "forward_backward", fb(model_id))
    next_seq = post(srv, "get_info", {"model_id": model_id}).body["next_seq_id"]
    return Ctx(srv, model_id, path, sampler, next_seq)


@pytest.fixture(scope="module")
def null_ctx() -> Iterator[Ctx]:
    with LocalServer(
        engine=NullEngine, max_body_bytes=LIMIT, head_timeout_s=DEADLINE, body_timeout_s=DEADLINE
    ) as srv:
        yield open_run(srv, NULL_MODEL)


@pytest.fixture(scope="module")
def real_ctx(real_engine: Any) -> Iterator[Ctx]:
    with LocalServer(engine=real_engine) as srv:
        yield open_run(srv, BUILTIN_NAME)


# ------------------------------------------------------------------------------------------------ the table

Send = Callable[[Ctx], Answer]


def body(route: str, make: Callable[[Ctx], Any]) -> Send:
    """Send ``make(ctx)`` as JSON to ``route`` and follow its future to the end."""
    return lambda ctx: outcome(ctx.srv, post(ctx.srv, route, make(ctx)))


def raw(
    route: str, make: Callable[[Ctx], bytes], headers: dict[str, Any] | None = None, method: str = "POST"
) -> Send:
    return lambda ctx: exchange(ctx.srv, method, route, make(ctx), headers)


def msgpack(route: str, make: Callable[[Ctx], Any]) -> Send:
    hdrs = {"Content-Type": _wire.MSGPACK, "Accept": _wire.MSGPACK}
    return lambda ctx: outcome(
        ctx.srv, exchange(ctx.srv, "POST", route, msgspec.msgpack.encode(make(ctx)), hdrs)
    )


def get(route: str) -> Send:
    return lambda ctx: exchange(ctx.srv, "GET", route.format(m=ctx.model_id))


def batched(route: str, make: Callable[[Ctx], Any]) -> Send:
    """The request inside a ``batch``: the inner answer is the case's answer."""

    def send(ctx: Ctx) -> Answer:
        item = {"path": route, "body": msgspec.Raw(json.dumps(make(ctx)).encode())}
        out = exchange(ctx.srv, "POST", "batch", msgspec.json.encode({"requests": [item]}))
        assert out.status == 200, out
        inner = out.body["responses"][0]
        return outcome(ctx.srv, Answer(inner["status"], inner["body"]))

    return send


def header(name: str, value: bytes) -> Send:
    return lambda ctx: exchange(ctx.srv, "GET", "get_server_capabilities", headers={name: value}, key=False)


def stalled_body(ctx: Ctx) -> Answer:
    """A head promising 1000 bytes of body, then 5 of them and silence: 408, and the connection is closed."""
    head = (
        f"POST /api/v1/forward HTTP/1.1\r\nHost: x\r\nX-API-Key: {ctx.srv.api_key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    got, closed = raw_socket(ctx.srv, head.encode() + b'{"mod')
    assert closed, "the server kept a stalled client's connection open"
    status_line, _, rest = got.partition(b"\r\n")
    return Answer(int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2]))


def stalled_head(ctx: Ctx) -> Answer:
    """Half a request head and silence: the server drops the connection after its head deadline."""
    t0 = time.monotonic()
    got, closed = raw_socket(ctx.srv, b"POST /api/v1/forward HTTP/1.1\r\nHost: x\r\nX-API-")
    assert closed and got == b"" and time.monotonic() - t0 < DEADLINE + 3
    return Answer(None, {"message": "closed"})


def gzip_json(obj: Any) -> bytes:
    return gzip.compress(json.dumps(obj).encode())


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    send: Send
    status: int | None
    names: str  # what the message must contain (the field, header or limit at fault)
    real: bool = False  # runs on the real engine (extreme values: weights compared exactly)
    xfail: str | None = None


TOKENS = "forward_backward_input.data[0].model_input.chunks[0].tokens"
TARGETS = "forward_backward_input.data[0].loss_fn_inputs.target_tokens"
WEIGHTS = "forward_backward_input.data[0].loss_fn_inputs.weights"
PROMPT = "prompt.chunks[0].tokens"
BIG = "m" * 600_000  # a value far longer than any message may quote


def tokens_case(name: str, value: Any, names: str = TOKENS) -> Case:
    return Case(
        f"fb tokens {name}", body("forward_backward", lambda c: fb(c.model_id, [datum(value)])), 400, names
    )


CASES: list[Case] = [
    # ---- HTTP level: encodings, headers, sizes, deadlines
    Case(
        "invalid gzip",
        raw("forward_backward", lambda c: b"not gzip", {"Content-Encoding": "gzip"}),
        400,
        "gzip",
    ),
    Case(
        "gzip bomb over the limit",
        raw("forward", lambda c: gzip.compress(b" " * (8 * LIMIT)), {"Content-Encoding": "gzip"}),
        413,
        "limit of 1 MiB",
    ),
    Case("body over the limit", raw("forward_backward", lambda c: b" " * (LIMIT + 1)), 413, "limit of 1 MiB"),
    Case(
        "gzip body inflating to a huge model id",
        raw("forward", lambda c: gzip_json(fwd(BIG)), {"Content-Encoding": "gzip"}),
        404,
        "model_id",
    ),
    Case("non-ASCII API key", header("X-API-Key", b"\xff\xfe\xe9key"), 401, "X-API-Key"),
    Case("missing API key", header("X-Other", b"1"), 401, "X-API-Key"),
    Case("wrong API key", header("X-API-Key", b"hpcai-local-wrong"), 401, "X-API-Key"),
    Case(
        "MessagePack type, JSON body",
        raw(
            "forward_backward", lambda c: json.dumps(fb(c.model_id)).encode(), {"Content-Type": _wire.MSGPACK}
        ),
        400,
        "Content-Type",
    ),
    Case(
        "JSON type, MessagePack body",
        raw("forward_backward", lambda c: msgspec.msgpack.encode(fb(c.model_id))),
        400,
        "Content-Type",
    ),
    Case(
        "MessagePack garbage",
        raw("forward", lambda c: b"\xc1\xc1", {"Content-Type": _wire.MSGPACK}),
        400,
        "MessagePack",
    ),
    Case("empty body", raw("forward_backward", lambda c: b""), 400, "empty"),
    Case("malformed JSON", raw("optim_step", lambda c: b'{"model_id": '), 400, "JSON"),
    Case("a JSON array", raw("optim_step", lambda c: b"[1, 2]"), 400, "object"),
    Case("stalled body", stalled_body, 408, "did not arrive"),
    Case("stalled head", stalled_head, None, "closed"),
    Case("unknown route", raw("forward_backwards", lambda c: b"{}"), 404, "no such endpoint"),
    Case("wrong method", raw("forward", lambda c: b"", method="GET"), 405, "does not accept GET"),
    # ---- ids past int64, in every route that takes them
    tokens_case("10**30", [1, 10**30, 2]),
    tokens_case("2**63", [1, 2**63, 2]),
    tokens_case("-2**63-1", [1, -(2**63) - 1, 2]),
    tokens_case("-1", [1, -1, 2]),
    Case(
        "fb target 2**63",
        body(
            "forward_backward",
            lambda c: fb(c.model_id, [datum(target_tokens={"data": [2, 2**63, 4], "dtype": "int64"})]),
        ),
        400,
        TARGETS,
    ),
    Case(
        "fb target 10**30",
        body(
            "forward_backward",
            lambda c: fb(c.model_id, [datum(target_tokens={"data": [2, 10**30, 4], "dtype": "int64"})]),
        ),
        400,
        TARGETS,
    ),
    Case(
        "forward tokens 2**63",
        body("forward", lambda c: fwd(c.model_id, [datum([2**63])])),
        400,
        "forward_input.data[0].model_input.chunks[0].tokens",
    ),
    Case("asample prompt 10**30", body("asample", lambda c: sample(tokens=[1, 10**30])), 400, PROMPT),
    Case("asample prompt 2**63", body("asample", lambda c: sample(tokens=[2**63])), 400, PROMPT),
    Case("sample prompt 2**63", body("sample", lambda c: sample(tokens=[2**63])), 400, PROMPT),
    Case(
        "msgpack fb tokens 2**64-1",
        msgpack("forward_backward", lambda c: fb(c.model_id, [datum([2**64 - 1])])),
        400,
        TOKENS,
    ),
    Case(
        "batched fb tokens 10**30",
        batched("forward_backward", lambda c: fb(c.model_id, [datum([10**30])])),
        400,
        TOKENS,
    ),
    # ---- token ids are integers
    tokens_case("1.5", [1, 1.5, 2]),
    tokens_case('"5"', [1, "5", 2]),
    tokens_case("true", [1, True, 2]),
    tokens_case("null", [1, None, 2]),
    tokens_case("scalar", 5),
    tokens_case("nested", [[1, 2, 3]]),
    tokens_case("object", {"a": 1}),
    Case("asample prompt 1.5", body("asample", lambda c: sample(tokens=[1, 1.5])), 400, PROMPT),
    Case('asample prompt "5"', body("asample", lambda c: sample(tokens=["5"])), 400, PROMPT),
    Case(
        "fb target 1.5",
        body(
            "forward_backward",
            lambda c: fb(c.model_id, [datum(target_tokens={"data": [2, 3.5, 4], "dtype": "int64"})]),
        ),
        400,
        TARGETS,
    ),
    Case(
        "fb weight '1'",
        body("forward_backward", lambda c: fb(c.model_id, [datum(weights=[1.0, "1", 1.0])])),
        400,
        WEIGHTS,
    ),
    Case(
        "fb weights shorter than targets",
        body("forward_backward", lambda c: fb(c.model_id, [datum(weights=[1.0])])),
        400,
        "weights",
    ),
    Case(
        "fb shape mismatch",
        body(
            "forward_backward",
            lambda c: fb(c.model_id, [datum(target_tokens={"data": [2, 3], "dtype": "int64", "shape": [3]})]),
        ),
        400,
        "target_tokens",
    ),
    Case("fb no data", body("forward_backward", lambda c: fb(c.model_id, [])), 400, "data"),
    # ---- enums list their values
    Case(
        "unknown loss_fn",
        body("forward_backward", lambda c: fb(c.model_id, loss_fn="mse")),
        400,
        "loss_fn: invalid enum value 'mse'; use one of cross_entropy",
    ),
    Case(
        "forward unknown loss_fn",
        body("forward", lambda c: fwd(c.model_id, loss_fn="l2")),
        400,
        "use one of cross_entropy",
    ),
    Case(
        "unknown dtype",
        body(
            "forward_backward",
            lambda c: fb(c.model_id, [datum(weights={"data": [1.0] * 3, "dtype": "float16"})]),
        ),
        400,
        "dtype: invalid enum value 'float16'; use one of int64",
    ),
    Case(
        "unknown chunk type",
        body(
            "forward_backward",
            lambda c: fb(
                c.model_id, [{**datum(), "model_input": {"chunks": [{"type": "video", "tokens": [1]}]}}]
            ),
        ),
        400,
        "chunks[0].type: invalid value 'video'; use one of encoded_text",
    ),
    # ---- sampling parameters, at submit time
    Case("seed -1", body("asample", lambda c: sample(seed=-1)), 400, "sampling_params.seed"),
    Case("seed 2**64", body("asample", lambda c: sample(seed=2**64)), 400, "sampling_params.seed"),
    Case("seed 1.5", body("asample", lambda c: sample(seed=1.5)), 400, "seed"),
    Case("top_k 0", body("asample", lambda c: sample(top_k=0)), 400, "top_k"),
    Case("num_samples 0", body("asample", lambda c: {**sample(), "num_samples": 0}), 400, "num_samples"),
    Case(
        "num_samples 10**6", body("asample", lambda c: {**sample(), "num_samples": 10**6}), 400, "num_samples"
    ),
    Case("max_tokens -1", body("asample", lambda c: sample(max_tokens=-1)), 400, "max_tokens"),
    Case("unknown base_model", body("asample", lambda c: sample("no/such-model")), 400, "base_model"),
    Case("huge base_model", body("sample", lambda c: sample(BIG)), 400, "base_model"),
    Case(
        "model_path not a checkpoint",
        body("asample", lambda c: {**sample(), "model_path": "s3://x"}),
        400,
        "model_path",
    ),
    # ---- optimizer
    Case(
        "learning_rate -1",
        body("optim_step", lambda c: adam(c.model_id, learning_rate=-1)),
        400,
        "adam_params.learning_rate",
    ),
    Case(
        "learning_rate 'fast'",
        body("optim_step", lambda c: adam(c.model_id, learning_rate="fast")),
        400,
        "adam_params.learning_rate",
    ),
    Case("beta1 1.0", body("optim_step", lambda c: adam(c.model_id, beta1=1.0)), 400, "adam_params.beta1"),
    Case("eps -1", body("optim_step", lambda c: adam(c.model_id, eps=-1)), 400, "adam_params.eps"),
    Case(
        "weight_decay -1",
        body("optim_step", lambda c: adam(c.model_id, weight_decay=-1)),
        400,
        "weight_decay",
    ),
    # ---- models, ordering, checkpoints
    Case("rank -1", body("create_model", lambda c: lora(rank=-1)), 400, "lora_config.rank"),
    Case("rank 10**30", body("create_model", lambda c: lora(rank=10**30)), 400, "rank"),
    Case(
        "nothing to train",
        body("create_model", lambda c: lora(train_attn=False, train_mlp=False, train_unembed=False)),
        400,
        "lora_config",
    ),
    Case(
        "create on an unknown base model",
        body("create_model", lambda c: {**lora(), "base_model": "x/y"}),
        400,
        "base_model",
    ),
    Case("unknown model_id", body("forward_backward", lambda c: fb("no-such-model")), 404, "model_id"),
    Case("huge model_id", body("optim_step", lambda c: adam(BIG)), 404, "model_id"),
    Case("seq_id 0", body("forward_backward", lambda c: fb(c.model_id, seq_id=0)), 400, "seq_id"),
    Case("seq_id 2**63", body("forward_backward", lambda c: fb(c.model_id, seq_id=2**63)), 400, "seq_id"),
    Case('seq_id "1"', body("forward_backward", lambda c: fb(c.model_id, seq_id="1")), 400, "seq_id"),
    Case(
        "seq_id far ahead",
        body("optim_step", lambda c: {**adam(c.model_id), "seq_id": c.next_seq + 10**6}),
        400,
        "seq_id",
    ),
    Case(
        "save path with ..",
        body("save_weights", lambda c: {"model_id": c.model_id, "path": "../x"}),
        400,
        "path",
    ),
    Case(
        "save path with /",
        body("save_weights", lambda c: {"model_id": c.model_id, "path": "a/b"}),
        400,
        "path",
    ),
    Case(
        "load a path of no checkpoint",
        body("load_weights", lambda c: {"model_id": c.model_id, "path": "hpcai://nope/weights/x"}),
        404,
        "path",
    ),
    Case(
        "load a malformed path",
        body("load_weights", lambda c: {"model_id": c.model_id, "path": BIG}),
        400,
        "path",
    ),
    Case(
        "load a sampler checkpoint with optimizer",
        body("load_weights", lambda c: {"model_id": c.model_id, "path": c.sampler, "optimizer": True}),
        400,
        "optimizer",
    ),
    Case(
        "sample base_model against model_path",
        body("asample", lambda c: {**sample("other/model"), "model_path": c.sampler}),
        400,
        "base_model",
    ),
    Case("unknown request_id", body("retrieve_future", lambda c: {"request_id": "nope"}), 404, "request_id"),
    Case("get_info of an unknown model", body("get_info", lambda c: {"model_id": "nope"}), 404, "model_id"),
    Case("unbatchable path", batched("training_runs", lambda c: {}), 400, "cannot be batched"),
    Case("runs limit 0", get("training_runs?limit=0"), 400, "limit"),
    Case("runs limit abc", get("training_runs?limit=abc"), 400, "limit"),
    Case("checkpoints of an unknown run", get("training_runs/nope/checkpoints"), 404, "training run"),
    Case("archive of an unknown checkpoint", get("training_runs/{m}/checkpoints/nope/archive"), 404, "nope"),
    Case(
        "delete an unknown checkpoint",
        lambda c: exchange(c.srv, "DELETE", f"training_runs/{c.model_id}/checkpoints/nope"),
        404,
        "nope",
    ),
    # ---- extreme finite values: refused, the weights exactly as before (real engine)
    Case(
        "cross-entropy weights 1e38",
        body("forward_backward", lambda c: fb(c.model_id, [datum(weights=[1e38] * 3)])),
        400,
        "weights",
        real=True,
    ),
    Case(
        "importance-sampling logprobs -1e30",
        body(
            "forward_backward",
            lambda c: fb(c.model_id, [rl_datum([-1e30, -1.0, -1.0], [1.0] * 3)], "importance_sampling"),
        ),
        400,
        "logprobs",
        real=True,
    ),
    Case(
        "PPO advantages 3e38",
        body("forward_backward", lambda c: fb(c.model_id, [rl_datum([-1.0] * 3, [3e38] * 3)], "ppo")),
        400,
        "advantages",
        real=True,
    ),
    Case(
        "learning rate 1e30",
        body("optim_step", lambda c: adam(c.model_id, learning_rate=1e30)),
        400,
        "learning_rate",
        real=True,
    ),
    Case(
        "weight decay 1e20 at learning rate 1e25",
        body("optim_step", lambda c: adam(c.model_id, learning_rate=1e25, weight_decay=1e20)),
        400,
        "learning_rate",
        real=True,
    ),
]


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name, marks=marks)


def test_the_table_is_large_and_its_names_unique() -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES if not c.real])
def test_hostile_request_null_engine(null_ctx: Ctx, case: Case) -> None:
    check(null_ctx, case)


@pytest.mark.parametrize("case", [_param(c) for c in CASES if c.real])
def test_hostile_request_real_engine(real_ctx: Ctx, case: Case) -> None:
    check(real_ctx, case)


def check(ctx: Ctx, case: Case) -> None:
    before = snapshot(ctx)
    answer = case.send(ctx)
    assert answer.status == case.status, (answer.status, answer.body)
    assert case.names in answer.message, answer.message
    assert len(answer.message) <= MESSAGE_MAX and len(answer.raw) <= MESSAGE_MAX + 200, len(answer.raw)
    if answer.status is not None:
        assert isinstance(answer.body, dict) and answer.body.get("error"), answer.body
        assert answer.status < 500
    assert snapshot(ctx) == before  # nothing changed, and the server still answers
