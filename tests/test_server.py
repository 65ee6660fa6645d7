"""The local server at the wire level: raw aiohttp requests shaped as the official SDK sends them.

No client library and no mocks: every test talks HTTP to a real ``LocalServer`` on 127.0.0.1. Most run on
``NullEngine`` (instant answers; its ``step:max`` counts the optimizer steps that ran before a request, which
makes execution order visible); the full-protocol tests run on the real engine with the built-in model too."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import ClientSession
from client_fixtures import LOOPS, run

from hpcai_async import types
from hpcai_async.server import NULL_MODEL, LocalServer, NullEngine
from hpcai_async.server.models import BUILTIN_NAME

Factory = Callable[..., LocalServer]

SAMPLING_PARAMS = {"max_tokens": 4, "seed": None, "stop": None, "temperature": 1, "top_k": -1, "top_p": 1}


# ------------------------------------------------------------------------------------------------ helpers


class Wire:
    """Raw requests to one server; JSON unless asked otherwise."""

    def __init__(self, session: ClientSession, srv: LocalServer) -> None:
        self.session = session
        self.srv = srv
        self.headers = {"X-API-Key": srv.api_key}

    async def post(
        self, path: str, body: Any, *, headers: dict[str, str] | None = None, msgpack: bool = False
    ) -> tuple[int, Any]:
        h = {**self.headers, **(headers or {})}
        if msgpack:
            h |= {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
            data = msgspec.msgpack.encode(body)
        else:
            h |= {"Content-Type": "application/json", "Accept": "application/json"}
            data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        async with self.session.post(f"/api/v1/{path}", data=data, headers=h) as resp:
            raw = await resp.read()
            if resp.content_type == "application/msgpack":
                return resp.status, msgspec.msgpack.decode(raw)
            return resp.status, msgspec.json.decode(raw) if raw else None

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(f"/api/v1/{path}", headers=self.headers) as resp:
            raw = await resp.read()
            return resp.status, msgspec.json.decode(raw) if raw else None

    async def submit(self, path: str, body: Any, **kw: Any) -> dict[str, Any]:
        status, out = await self.post(path, body, **kw)
        assert status == 200, out
        assert set(out) >= {"request_id", "model_id"}, out
        return dict(out)

    async def poll(self, request_id: str, model_id: str | None = None) -> Any:
        """One retrieve_future call (a long-poll): the result, an error body or a try_again."""
        body = {"request_id": request_id} | ({"model_id": model_id} if model_id else {})
        status, out = await self.post("retrieve_future", body, headers={"X-HpcAI-Request-Iteration": "0"})
        assert status == 200, out
        return out

    async def result(self, future: dict[str, Any], deadline: float = 30.0) -> Any:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            out = await self.poll(future["request_id"], future.get("model_id"))
            if out.get("type") != "try_again":
                return out
        raise AssertionError(f"no result for {future} in {deadline} s")

    async def call(self, path: str, body: Any, **kw: Any) -> Any:
        return await self.result(await self.submit(path, body, **kw))

    async def create(self, base_model: str = NULL_MODEL, rank: int = 4) -> str:
        body = {
            "base_model": base_model,
            "type": "create_model",
            "lora_config": {
                "rank": rank,
                "seed": 0,
                "train_mlp": False,
                "train_attn": True,
                "train_unembed": False,
            },
        }
        out = await self.call("create_model", body)
        assert out["type"] == "create_model" and "error" not in out, out
        return str(out["model_id"])


def wire_test(
    srv: LocalServer, body: Callable[[Wire], Any], loop: str = "asyncio", timeout: float = 60.0
) -> Any:
    async def main() -> Any:
        async with ClientSession(srv.url) as session:
            return await body(Wire(session, srv))

    return run(main, loop, timeout)


def text_chunk(tokens: list[int]) -> dict[str, Any]:
    return {"type": "encoded_text", "tokens": tokens}


def ce_datum(tokens: list[int], shape: bool = True) -> dict[str, Any]:
    """A cross_entropy datum as the official SDK dumps it (weights as JSON ints, shape given or null)."""
    n = len(tokens) - 1
    return {
        "model_input": {"chunks": [text_chunk(tokens[:-1])]},
        "loss_fn_inputs": {
            "target_tokens": {"data": tokens[1:], "dtype": "int64", "shape": [n] if shape else None},
            "weights": {"data": [1] * n, "dtype": "float32", "shape": [n] if shape else None},
        },
    }


def fb_body(model_id: str, data: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    data = data if data is not None else [ce_datum([1, 2, 3, 4])]
    return {
        "forward_backward_input": {"loss_fn": "cross_entropy", "data": data},
        "model_id": model_id,
        **extra,
    }


def fwd_body(model_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "forward_input": {"loss_fn": "cross_entropy", "data": [ce_datum([1, 2, 3])]},
        "model_id": model_id,
        **extra,
    }


def adam_body(model_id: str, **extra: Any) -> dict[str, Any]:
    params = {"learning_rate": 0.0001, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12}
    return {"adam_params": params, "model_id": model_id, **extra}


def sample_body(**where: Any) -> dict[str, Any]:
    return {
        "prompt": {"chunks": [text_chunk([1, 2, 3])]},
        "sampling_params": dict(SAMPLING_PARAMS),
        "num_samples": 2,
        "prompt_logprobs": False,
        **where,
    }


class GatedEngine(NullEngine):
    """NullEngine whose forward/forward_backward wait for ``gate`` (to hold the device busy on purpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.sample_calls: list[int] = []
        self.sample_gate: threading.Event | None = None

    def forward(self, run_id: str, data: Any, loss_fn: str) -> types.ForwardBackwardOutput:
        assert self.gate.wait(30)
        return super().forward(run_id, data, loss_fn)

    def sample(self, jobs: Any) -> list[types.SampleResponse]:
        self.sample_calls.append(len(jobs))
        if self.sample_gate is not None:
            assert self.sample_gate.wait(30)
        return super().sample(jobs)


class FailingEngine(NullEngine):
    """NullEngine whose optim_step fails while running, and whose save dies half-way through writing."""

    def optim_step(self, run_id: str, adam: types.AdamParams) -> types.OptimStepResponse:
        raise RuntimeError("the optimizer exploded")

    def save(
        self, run_id: str, directory: str | Path, *, optimizer: bool = True, merged: bool = False
    ) -> None:
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")


# ----------------------------------------------------------------------------------------- auth, capabilities


def test_auth_is_required_except_for_healthz(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        async with w.session.get("/api/v1/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        for headers in ({}, {"X-API-Key": "wrong"}):
            async with w.session.get("/api/v1/get_server_capabilities", headers=headers) as resp:
                assert resp.status == 401
                out = await resp.json()
                assert out["error"] == "AuthenticationError" and "X-API-Key" in out["message"]
            async with w.session.post(
                "/api/v1/create_model", json={"base_model": NULL_MODEL}, headers=headers
            ) as r:
                assert r.status == 401
        status, _ = await w.get("training_runs")
        assert status == 200

    wire_test(null_server, body)


def test_capabilities_and_unknown_routes(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        status, caps = await w.get("get_server_capabilities")
        assert status == 200
        assert caps["supported_models"] == [{"model_name": NULL_MODEL, "max_context_length": 65536}]
        assert set(caps["features"]) >= {"seq_id", "msgpack", "long_poll"}
        status, out = await w.get("no_such_thing")
        assert status == 404 and out["error"] == "NotFoundError" and "no_such_thing" in out["message"]
        status, out = await w.post(
            "telemetry", {"events": [], "platform": "x", "sdk_version": "0.1.5", "session_id": "s"}
        )
        assert (status, out) == (200, {"status": "accepted"})

    wire_test(null_server, body)


def test_hosted_dialect_advertises_no_extensions(server_factory: Factory) -> None:
    async def body(w: Wire) -> None:
        status, caps = await w.get("get_server_capabilities")
        assert status == 200 and caps["features"] == []

    wire_test(server_factory(dialect="hosted"), body)
    with pytest.raises(ValueError, match="dialect must be one of"):
        LocalServer(dialect="cloud")


def test_model_alias_lists_the_model_under_another_name() -> None:
    from hpcai_async.server.models import resolve_model

    spec = resolve_model(f"Qwen/Qwen3-0.6B={BUILTIN_NAME}")
    assert spec.name == "Qwen/Qwen3-0.6B" and spec.path == resolve_model(BUILTIN_NAME).path
    with pytest.raises(ValueError, match="ALIAS=NAME_OR_DIR"):
        resolve_model(f"={BUILTIN_NAME}")


# ---------------------------------------------------------------------------------------- official SDK shapes


def official_flow(srv: LocalServer, base_model: str) -> None:
    """Every future endpoint with bodies shaped as hpcai 0.2.0 sends them, and the answers it parses."""

    async def body(w: Wire) -> None:
        model_id = await w.create(base_model)
        assert uuid.UUID(model_id).version == 4

        status, info = await w.post("get_info", {"model_id": model_id})
        assert status == 200 and info["model_data"]["model_name"] == base_model and info["lora_rank"] == 4
        assert info["model_id"] == model_id and info["is_lora"] is True

        fb = await w.submit(
            "forward_backward", fb_body(model_id, [ce_datum([1, 2, 3, 4, 5]), ce_datum([6, 7, 8], False)])
        )
        opt = await w.submit("optim_step", adam_body(model_id))
        out = await w.result(fb)
        assert out["loss_fn_output_type"] == "cross_entropy"
        assert [len(o["logprobs"]["data"]) for o in out["loss_fn_outputs"]] == [4, 2]
        assert all(o["logprobs"]["dtype"] == "float32" for o in out["loss_fn_outputs"])
        assert {"loss:mean", "num_examples:sum", "step:max"} <= set(out["metrics"])
        assert all(k.count(":") == 1 for k in out["metrics"])
        out = await w.result(opt)
        assert out["metrics"]["step:max"] == 1 and out["metrics"]["learning_rate:mean"] == pytest.approx(1e-4)

        out = await w.call("forward", fwd_body(model_id))
        assert out["metrics"]["step:max"] == 1 and len(out["loss_fn_outputs"][0]["logprobs"]["data"]) == 2

        saved = await w.call("save_weights", {"model_id": model_id, "path": "initial"})
        assert saved == {"path": f"hpcai://{model_id}/weights/initial_training", "type": "save_weights"}
        sampler = await w.call("save_weights_for_sampler", {"model_id": model_id, "path": "initial"})
        assert sampler == {
            "path": f"hpcai://{model_id}/sampler_weights/initial_sampler",
            "type": "save_weights_for_sampler",
        }
        loaded = await w.call("load_weights", {"model_id": model_id, "path": saved["path"]})
        assert loaded == {"path": saved["path"], "type": "load_weights"}

        for where in (
            {"base_model": base_model},
            {"model_path": sampler["path"]},
            {"model_path": saved["path"]},
        ):
            out = await w.call(
                "asample", sample_body(**where), headers={"X-HpcAI-Sampling-Backpressure": "1"}
            )
            assert out["type"] == "sample" and len(out["sequences"]) == 2, out
            for seq in out["sequences"]:
                assert 1 <= len(seq["tokens"]) <= 4 and len(seq["logprobs"]) == len(seq["tokens"])
                assert seq["stop_reason"] in ("length", "stop")
        # compute_logprobs: max_tokens 1, prompt_logprobs true
        lp_body = sample_body(base_model=base_model) | {"num_samples": 1, "prompt_logprobs": True}
        lp_body["sampling_params"] = {**SAMPLING_PARAMS, "max_tokens": 1}
        out = await w.call("asample", lp_body)
        assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == 3
        status, out = await w.post("sample", sample_body(base_model=base_model))
        assert status == 200 and len(out["sequences"]) == 2

        status, runs = await w.get("training_runs")
        assert status == 200
        run_ = next(r for r in runs["training_runs"] if r["training_run_id"] == model_id)
        assert run_["base_model"] == base_model and run_["is_lora"] and run_["lora_rank"] == 4
        assert run_["last_checkpoint"]["checkpoint_id"] == "initial_training"
        assert run_["last_sampler_checkpoint"]["checkpoint_path"] == sampler["path"]
        status, ckpts = await w.get(f"training_runs/{model_id}/checkpoints")
        assert status == 200
        assert sorted(c["checkpoint_id"] for c in ckpts["checkpoints"]) == [
            "initial_sampler",
            "initial_training",
        ]
        assert {c["checkpoint_type"] for c in ckpts["checkpoints"]} == {"training", "sampler"}

        out = await w.call("unload_model", {"model_id": model_id})
        assert out == {"model_id": model_id, "type": "unload_model"}
        status, ckpts = await w.get(f"training_runs/{model_id}/checkpoints")
        assert status == 200 and len(ckpts["checkpoints"]) == 2  # unloading never deletes checkpoints
        status, out = await w.post("forward", fwd_body(model_id))
        assert status == 404 and "create_training_client_from_state" in out["message"]

    wire_test(srv, body, timeout=120)


def test_official_sdk_request_shapes_null_engine(null_server: LocalServer) -> None:
    official_flow(null_server, NULL_MODEL)


def test_official_sdk_request_shapes_real_engine(server: LocalServer) -> None:
    official_flow(server, BUILTIN_NAME)


def test_responses_validate_as_the_shared_structs(null_server: LocalServer) -> None:
    """Every answer decodes strictly into the structs mirroring the official SDK's pydantic models."""

    async def body(w: Wire) -> None:
        model_id = await w.create()
        checks: list[tuple[Any, type[Any]]] = [
            (await w.call("forward_backward", fb_body(model_id)), types.ForwardBackwardOutput),
            (await w.call("optim_step", adam_body(model_id)), types.OptimStepResponse),
            (await w.call("save_weights", {"model_id": model_id, "path": "a"}), types.SaveWeightsResponse),
            (await w.call("asample", sample_body(base_model=NULL_MODEL)), types.SampleResponse),
            ((await w.post("get_info", {"model_id": model_id}))[1], types.GetInfoResponse),
            ((await w.get("get_server_capabilities"))[1], types.GetServerCapabilitiesResponse),
            ((await w.get("training_runs"))[1], types.TrainingRunsResponse),
            ((await w.get(f"training_runs/{model_id}"))[1], types.TrainingRun),
            ((await w.get(f"training_runs/{model_id}/checkpoints"))[1], types.CheckpointsListResponse),
        ]
        for obj, cls in checks:
            msgspec.convert(obj, cls, strict=False)
        run_ = msgspec.convert(checks[7][0], types.TrainingRun, strict=False)
        assert run_.last_request_time.tzinfo is not None

    wire_test(null_server, body)


# ------------------------------------------------------------------------------------------------ msgpack


def test_msgpack_round_trip_with_raw_tensor_bytes(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        tokens = np.arange(1, 9, dtype="<i8")
        datum = {
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1].tobytes()}]},
            "loss_fn_inputs": {
                "target_tokens": {"data": tokens[1:].tobytes(), "dtype": "int64", "shape": [7]},
                "weights": {"data": np.ones(7, "<f4").tobytes(), "dtype": "float32"},
            },
        }
        req = {"forward_backward_input": {"loss_fn": "cross_entropy", "data": [datum]}, "model_id": model_id}
        future = await w.submit("forward_backward", req, msgpack=True)
        status, out = await w.post("retrieve_future", {"request_id": future["request_id"]}, msgpack=True)
        assert status == 200
        result = msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=types.ForwardBackwardOutput)
        logprobs = result.loss_fn_outputs[0]["logprobs"]
        assert isinstance(logprobs.raw, bytes) and len(logprobs.raw) == 7 * 4  # raw float32, not a list
        assert logprobs.to_numpy().shape == (7,)
        # errors follow the negotiated codec too
        status, out = await w.post("forward_backward", {**req, "model_id": "nope"}, msgpack=True)
        assert status == 404 and out["error"] == "NotFoundError"
        # a malformed MessagePack body is a 400
        async with w.session.post(
            "/api/v1/forward", data=b"\xc1", headers={**w.headers, "Content-Type": "application/msgpack"}
        ) as resp:
            assert resp.status == 400 and "MessagePack" in (await resp.json())["message"]

    wire_test(null_server, body)


# ------------------------------------------------------------------------------------------------ futures


def test_long_poll_answers_when_ready_and_try_again_after_long_poll_s(server_factory: Factory) -> None:
    engine = GatedEngine()
    srv = server_factory(engine=engine, long_poll_s=0.5)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        future = await w.submit("forward", fwd_body(model_id))  # blocks the device until the gate opens
        t0 = time.monotonic()
        out = await w.poll(future["request_id"], model_id)
        assert out == {"type": "try_again", "request_id": future["request_id"], "queue_state": "active"}
        assert 0.45 < time.monotonic() - t0 < 2.0
        # health checks, other polls and submissions answer at once while the engine is busy
        t0 = time.monotonic()
        status, _ = await w.get("get_server_capabilities")
        queued = await w.submit("optim_step", adam_body(model_id))
        assert status == 200 and time.monotonic() - t0 < 0.3
        poll = asyncio.ensure_future(w.poll(future["request_id"], model_id))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        engine.gate.set()
        out = await poll
        assert "loss_fn_outputs" in out and time.monotonic() - t0 < 0.3  # answered as soon as it was ready
        assert (await w.result(queued))["metrics"]["step:max"] == 1

    wire_test(srv, body)


def test_unknown_future_is_404_and_an_expired_one_410(server_factory: Factory) -> None:
    srv = server_factory(retention_s=0.3)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        future = await w.submit("optim_step", adam_body(model_id))
        assert (await w.result(future))["metrics"]["step:max"] == 1
        status, out = await w.post("retrieve_future", {"request_id": str(uuid.uuid4())})
        assert status == 404 and out["error"] == "NotFoundError"
        await asyncio.sleep(0.5)
        status, out = await w.post("retrieve_future", {"request_id": future["request_id"]})
        assert status == 410 and out["error"] == "GoneError" and "expired" in out["message"]
        # a result already handed out is kept only delivered_retention_s
        srv.scheduler.retention_s = 3600
        srv.scheduler.delivered_retention_s = 0.3
        future = await w.submit("optim_step", adam_body(model_id))
        await w.result(future)
        await w.result(future)  # can be fetched again for a while
        await asyncio.sleep(0.5)
        status, out = await w.post("retrieve_future", {"request_id": future["request_id"]})
        assert status == 410

    wire_test(srv, body)


def test_a_job_failing_while_running_resolves_to_an_error_body(server_factory: Factory) -> None:
    srv = server_factory(engine=FailingEngine)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        out = await w.call("optim_step", adam_body(model_id))
        assert out == {
            "error": "InternalServerError",
            "message": "RuntimeError: the optimizer exploded",
            "details": None,
            "code": None,
        }
        # a save dying half-way leaves no checkpoint and no leftovers
        out = await w.call("save_weights", {"model_id": model_id, "path": "broken"})
        assert out["error"] == "InternalServerError" and "disk full" in out["message"]
        status, listing = await w.get(f"training_runs/{model_id}/checkpoints")
        assert status == 200 and listing["checkpoints"] == []
        assert srv.store is not None and list(srv.store.tmp_dir.iterdir()) == []
        assert "loss_fn_outputs" in await w.call("forward", fwd_body(model_id))  # the model goes on

    wire_test(srv, body)


# ------------------------------------------------------------------------------------------------ ordering


@pytest.mark.parametrize("loop", LOOPS)
def test_seq_ids_order_requests_that_arrive_out_of_order(null_server: LocalServer, loop: str) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        fwd = await w.submit("forward", fwd_body(model_id, seq_id=3))
        assert (await w.poll(fwd["request_id"], model_id))["type"] == "try_again"  # waits for seq_id 1 and 2
        second = await w.submit("optim_step", adam_body(model_id, seq_id=2))
        first = await w.submit("optim_step", adam_body(model_id, seq_id=1))
        assert (await w.result(first))["metrics"]["step:max"] == 1
        assert (await w.result(second))["metrics"]["step:max"] == 2
        assert (await w.result(fwd))["metrics"]["step:max"] == 2  # ran after both steps
        # requests without seq_id run in arrival order, after what was released before them
        a = await w.submit("optim_step", adam_body(model_id))
        b = await w.submit("forward", fwd_body(model_id))
        assert (await w.result(a))["metrics"]["step:max"] == 3
        assert (await w.result(b))["metrics"]["step:max"] == 3

    srv = null_server
    srv.scheduler.long_poll_s = 0.2
    wire_test(srv, body, loop)


class TurnstileEngine(NullEngine):
    """NullEngine whose forward runs only when a permit is released (one forward per permit)."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)

    def forward(self, run_id: str, data: Any, loss_fn: str) -> types.ForwardBackwardOutput:
        assert self.permits.acquire(timeout=30)
        return super().forward(run_id, data, loss_fn)


def test_jobs_queued_together_each_finish_as_soon_as_they_have_run(server_factory: Factory) -> None:
    engine = TurnstileEngine()
    srv = server_factory(engine=engine, long_poll_s=5)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        first = await w.submit("forward", fwd_body(model_id, seq_id=1))  # holds the device
        step = await w.submit("optim_step", adam_body(model_id, seq_id=2))  # these two queue behind it and
        last = await w.submit("forward", fwd_body(model_id, seq_id=3))  # go to the device thread together
        engine.permits.release()
        assert (await w.result(first))["metrics"]["step:max"] == 0
        assert (await w.result(step))["metrics"]["step:max"] == 1  # not held back by the forward after it
        assert srv.scheduler.busy  # which is still waiting for its permit
        engine.permits.release()
        assert (await w.result(last))["metrics"]["step:max"] == 1

    wire_test(srv, body)


def test_a_missing_seq_id_times_out_and_the_model_continues(server_factory: Factory) -> None:
    srv = server_factory(seq_gap_timeout_s=0.3)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        waiting = [await w.submit("optim_step", adam_body(model_id, seq_id=s)) for s in (2, 3)]
        for future in waiting:
            out = await w.result(future)
            assert out["error"] == "BadRequestError"
            assert "seq_id 1 " in out["message"] and "never arrived" in out["message"], out
        out = await w.call("forward", fwd_body(model_id, seq_id=4))
        assert out["metrics"]["step:max"] == 0  # 2 and 3 did not run; 4 did
        status, out = await w.post("optim_step", adam_body(model_id, seq_id=1))
        assert status == 409 and "behind" in out["message"]

    wire_test(srv, body)


def test_a_rejected_seq_request_does_not_stall_the_ones_after_it(server_factory: Factory) -> None:
    srv = server_factory(seq_gap_timeout_s=30)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        bad = fb_body(model_id, [ce_datum([1, 2, 3])], seq_id=1)
        bad["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]["data"] = [1]
        status, out = await w.post("forward_backward", bad)
        assert status == 400 and "weights" in out["message"]
        status, out = await w.post(
            "forward_backward", {"model_id": model_id, "seq_id": 2, "forward_backward_input": 3}
        )
        assert status == 400 and "forward_backward_input" in out["message"]
        t0 = time.monotonic()
        out = await w.call("optim_step", adam_body(model_id, seq_id=3))
        assert out["metrics"]["step:max"] == 1 and time.monotonic() - t0 < 5
        status, out = await w.post("forward_backward", bad)  # the same bad request again: the same answer
        assert status == 400 and "weights" in out["message"]

    wire_test(srv, body)


def test_different_models_interleave(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        a, b = await asyncio.gather(w.create(), w.create())
        futures = []
        for i in range(10):
            futures.append((a, await w.submit("optim_step", adam_body(a, seq_id=i + 1))))
            futures.append((b, await w.submit("optim_step", adam_body(b))))
        steps: dict[str, list[float]] = {a: [], b: []}
        for model_id, future in futures:
            steps[model_id].append((await w.result(future))["metrics"]["step:max"])
        assert steps[a] == steps[b] == [float(i) for i in range(1, 11)]

    wire_test(null_server, body)


# ------------------------------------------------------------------------------------------------ idempotency


def test_the_same_idempotency_key_returns_the_same_future_and_runs_once(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        key = {"X-Idempotency-Key": "session:0:7"}
        first = await w.submit("optim_step", adam_body(model_id), headers=key)
        again = await w.submit("optim_step", adam_body(model_id), headers=key)
        assert again["request_id"] == first["request_id"]
        # the same (model_id, seq_id) with the same body is the same request too, whatever its key
        s1 = await w.submit("optim_step", adam_body(model_id, seq_id=1), headers={"X-Idempotency-Key": "k1"})
        s1b = await w.submit("optim_step", adam_body(model_id, seq_id=1), headers={"X-Idempotency-Key": "k2"})
        assert s1b["request_id"] == s1["request_id"]
        out = await w.call("forward", fwd_body(model_id))
        assert out["metrics"]["step:max"] == 2  # each step ran once
        # create_model is deduplicated as well
        create = {"base_model": NULL_MODEL, "lora_config": {"rank": 4}}
        c1 = await w.submit("create_model", create, headers={"X-Idempotency-Key": "stainless-python-retry-1"})
        c2 = await w.submit("create_model", create, headers={"X-Idempotency-Key": "stainless-python-retry-1"})
        assert c1 == c2
        await w.result(c1)
        _, runs = await w.get("training_runs")
        assert runs["cursor"]["total_count"] == 2

    wire_test(null_server, body)


def test_a_reused_key_or_seq_id_with_a_different_body_is_409(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        key = {"X-Idempotency-Key": "session:0:1"}
        await w.submit("optim_step", adam_body(model_id), headers=key)
        status, out = await w.post("forward", fwd_body(model_id), headers=key)
        assert status == 409 and out["error"] == "ConflictError" and "session:0:1" in out["message"]
        await w.submit("optim_step", adam_body(model_id, seq_id=1))
        status, out = await w.post("forward", fwd_body(model_id, seq_id=1))
        assert status == 409 and "seq_id 1" in out["message"]
        out = await w.call("forward", fwd_body(model_id, seq_id=2))
        assert out["metrics"]["step:max"] == 2  # neither conflicting request ran

    wire_test(null_server, body)


# ------------------------------------------------------------------------------------------------ batch


def test_a_batch_answers_each_request_as_if_it_came_alone(null_server: LocalServer) -> None:
    inline = {"X-HpcAI-Async-Inline-Wait": "0.05"}

    async def body(w: Wire) -> None:
        model_id = await w.create()
        bad = fb_body(model_id, [ce_datum([1, 2, 3])], seq_id=4)
        bad["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]["data"] = [1]
        items = [
            {"path": "optim_step", "body": adam_body(model_id, seq_id=2), "idempotency_key": "s:0:1"},
            {"path": "optim_step", "body": adam_body(model_id, seq_id=1), "idempotency_key": "s:0:0"},
            {"path": "forward", "body": fwd_body(model_id, seq_id=3)},
            {"path": "forward_backward", "body": bad},
            {"path": "create_model", "body": {"base_model": NULL_MODEL}},
            {"path": "get_info", "body": {"model_id": model_id, "seq_id": 5}},
            {"path": "asample", "body": sample_body(base_model=NULL_MODEL)},
            {"path": "forward", "body": fwd_body(model_id, seq_id=6)},
        ]
        status, out = await w.post("batch", {"requests": items}, headers=inline)
        assert status == 200, out
        answers = out["responses"]
        assert [a["status"] for a in answers] == [200, 200, 200, 400, 400, 200, 200, 200]
        steps = [answers[i]["body"]["result"]["metrics"]["step:max"] for i in (0, 1, 2, 7)]
        assert steps == [2, 1, 2, 2]  # in seq_id order; the rejected seq_id 4 passed its turn
        assert "weights" in answers[3]["body"]["message"]
        assert "cannot be batched" in answers[4]["body"]["message"]
        assert answers[5]["body"]["model_id"] == model_id  # get_info answers directly
        assert answers[6]["body"]["result"]["type"] == "sample"
        # dedupe spans batches and single requests: the same key is the same future, run once
        again = await w.submit(
            "optim_step", adam_body(model_id, seq_id=2), headers={"X-Idempotency-Key": "s:0:1"}
        )
        assert again["request_id"] == answers[0]["body"]["request_id"]
        # MessagePack: the requests and answers are MessagePack inside MessagePack
        packed = [{"path": "forward", "body": fwd_body(model_id, seq_id=7)}]
        status, out = await w.post("batch", {"requests": packed}, headers=inline, msgpack=True)
        assert status == 200 and out["responses"][0]["body"]["result"]["metrics"]["step:max"] == 2
        # without the inline wait each answer is the future, as a single submit's would be
        status, out = await w.post("batch", {"requests": [{"path": "forward", "body": fwd_body(model_id)}]})
        assert set(out["responses"][0]["body"]) == {"request_id", "model_id"}
        assert (await w.result(out["responses"][0]["body"]))["metrics"]["step:max"] == 2

    wire_test(null_server, body)


def test_polls_in_a_batch_wait_until_the_first_of_them_is_answered(server_factory: Factory) -> None:
    engine = GatedEngine()
    srv = server_factory(engine=engine, long_poll_s=2.0)

    def polls(*futures: dict[str, Any]) -> dict[str, Any]:
        return {"requests": [{"path": "retrieve_future", "body": f} for f in futures]}

    async def body(w: Wire) -> None:
        model_id = await w.create()
        step = await w.submit("optim_step", adam_body(model_id))
        await w.result(step)
        held = await w.submit("forward", fwd_body(model_id))  # waits for the gate
        t0 = time.monotonic()
        status, out = await w.post("batch", polls(held, step, {"request_id": "nope"}))
        answers = out["responses"]
        assert status == 200 and [a["status"] for a in answers] == [200, 200, 404]
        assert answers[0]["body"] == {
            "type": "try_again",
            "request_id": held["request_id"],
            "queue_state": "batch",
        }
        assert answers[1]["body"]["metrics"]["step:max"] == 1
        assert time.monotonic() - t0 < 1.0  # the ready poll ended the batch's wait
        status, out = await w.post("batch", polls(held))  # nothing ready: a plain long-poll
        assert out["responses"][0]["body"]["queue_state"] == "active"
        t0 = time.monotonic()
        status, out = await w.post("batch", polls(held, {"request_id": "nope"}))  # a 404 is an answer too
        assert [a["status"] for a in out["responses"]] == [200, 404] and time.monotonic() - t0 < 1.0
        engine.gate.set()
        status, out = await w.post("batch", polls(held))
        assert out["responses"][0]["body"]["metrics"]["step:max"] == 1

    wire_test(srv, body)


def test_a_malformed_or_oversized_batch_is_400_and_runs_nothing(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        one = {"path": "optim_step", "body": adam_body(model_id)}
        status, out = await w.post("batch", {"requests": [one] * 1025})
        assert status == 400 and "at most 1024" in out["message"], out
        status, out = await w.post("batch", {"requests": [{"body": adam_body(model_id)}]})
        assert status == 400 and "requests[0]" in out["message"] and "path" in out["message"], out
        assert (await w.call("forward", fwd_body(model_id)))["metrics"]["step:max"] == 0

    wire_test(null_server, body)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_400_naming_the_field_and_changes_nothing(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        await w.call("save_weights", {"model_id": model_id, "path": "keep"})

        async def bad(path: str, req: Any, status: int, *needles: str) -> None:
            got, out = await w.post(path, req)
            assert got == status, (path, out)
            assert set(out) >= {"error", "message"}
            for needle in needles:
                assert needle in out["message"], (needle, out["message"])

        await bad("forward_backward", b"{not json", 400, "not valid JSON")
        await bad("forward_backward", b"", 400, "empty")
        await bad(
            "forward_backward",
            {"forward_backward_input": {"data": [], "loss_fn": "cross_entropy"}},
            400,
            "model_id",
        )
        wrong = fb_body(model_id)
        wrong["forward_backward_input"]["data"][0]["model_input"]["chunks"][0]["tokens"] = ["a"]
        await bad(
            "forward_backward", wrong, 400, "forward_backward_input.data[0].model_input.chunks[0].tokens"
        )
        wrong = fb_body(model_id)
        wrong["forward_backward_input"]["data"][0]["loss_fn_inputs"]["target_tokens"]["dtype"] = "int32"
        await bad("forward_backward", wrong, 400, "dtype", "int32")
        wrong = fb_body(model_id)
        wrong["forward_backward_input"]["loss_fn"] = "mse"
        await bad("forward_backward", wrong, 400, "loss_fn", "mse")
        short = fb_body(model_id, [ce_datum([1, 2, 3, 4])])
        short["forward_backward_input"]["data"][0]["loss_fn_inputs"]["target_tokens"]["data"] = [2, 3]
        short["forward_backward_input"]["data"][0]["loss_fn_inputs"]["target_tokens"]["shape"] = [2]
        await bad("forward_backward", short, 400, "forward_backward_input.data[0]", "target_tokens")
        await bad("forward_backward", fb_body(model_id, []), 400, "empty")
        await bad("forward_backward", fb_body(str(uuid.uuid4())), 404, "create")
        await bad(
            "optim_step", adam_body(model_id) | {"adam_params": {"learning_rate": -1}}, 400, "learning_rate"
        )
        await bad("optim_step", adam_body(model_id) | {"adam_params": {"beta1": 1.5}}, 400, "beta1")
        await bad("create_model", {"base_model": "gpt-9"}, 400, "gpt-9", NULL_MODEL)
        await bad("create_model", {"base_model": NULL_MODEL, "lora_config": {"rank": -1}}, 400, "rank")
        await bad("create_model", {"base_model": NULL_MODEL, "lora_config": {"rank": 100000}}, 400, "rank")
        no_flags = {"rank": 4, "train_mlp": False, "train_attn": False, "train_unembed": False}
        await bad("create_model", {"base_model": NULL_MODEL, "lora_config": no_flags}, 400, "train_attn")
        await bad("save_weights", {"model_id": model_id, "path": "a/b"}, 400, "path", "'a/b'")
        await bad("load_weights", {"model_id": model_id, "path": "s3://bucket/x"}, 400, "path", "hpcai://")
        await bad(
            "load_weights",
            {"model_id": model_id, "path": f"hpcai://{model_id}/weights/nope_training"},
            404,
            "nope",
        )
        await bad(
            "load_weights",
            {"model_id": model_id, "path": f"hpcai://{model_id}/bogus/keep_training"},
            400,
            "bogus",
        )
        await bad("asample", sample_body(), 400, "base_model", "model_path")
        await bad("asample", sample_body(base_model="gpt-9"), 400, "gpt-9")
        await bad(
            "asample",
            sample_body(model_path=f"hpcai://{uuid.uuid4()}/sampler_weights/x_sampler"),
            404,
            "does not exist",
        )
        hot = sample_body(base_model=NULL_MODEL)
        hot["sampling_params"]["temperature"] = -1
        await bad("asample", hot, 400, "temperature")
        await bad("asample", sample_body(base_model=NULL_MODEL) | {"num_samples": 0}, 400, "num_samples")
        await bad("sample", sample_body(base_model=NULL_MODEL) | {"prompt": {"chunks": []}}, 400, "prompt")
        await bad("retrieve_future", {"request": "x"}, 400, "request_id")
        status, _ = await w.get("training_runs?limit=abc")
        assert status == 400
        status, _ = await w.get("training_runs?offset=-1")
        assert status == 400
        status, out = await w.get(f"training_runs/{uuid.uuid4()}")
        assert status == 404 and out["error"] == "NotFoundError"
        # nothing changed: one run, its one checkpoint, no optimizer step, nothing queued
        status, runs = await w.get("training_runs")
        assert runs["cursor"]["total_count"] == 1
        status, ckpts = await w.get(f"training_runs/{model_id}/checkpoints")
        assert [c["checkpoint_id"] for c in ckpts["checkpoints"]] == ["keep_training"]
        assert (await w.call("forward", fwd_body(model_id)))["metrics"]["step:max"] == 0

    wire_test(null_server, body)


# ------------------------------------------------------------------------------------------- sampling batches


def test_concurrent_sample_requests_run_as_few_batched_engine_calls(server_factory: Factory) -> None:
    engine = GatedEngine()
    srv = server_factory(engine=engine)

    async def body(w: Wire) -> None:
        engine.sample_gate = threading.Event()
        first = await w.submit("asample", sample_body(base_model=NULL_MODEL) | {"num_samples": 1})
        for _ in range(100):  # wait until the first batch holds the device
            if engine.sample_calls:
                break
            await asyncio.sleep(0.01)
        futures = await asyncio.gather(
            *(w.submit("asample", sample_body(base_model=NULL_MODEL) | {"num_samples": 1}) for _ in range(64))
        )
        engine.sample_gate.set()
        results = await asyncio.gather(*(w.result(f) for f in [first, *futures]))
        assert all(len(r["sequences"]) == 1 for r in results)
        assert engine.sample_calls == [1, 64]  # everything that queued meanwhile ran as one batch
        # a batch holds at most 256 sequences
        engine.sample_calls.clear()
        engine.sample_gate = threading.Event()
        blocker = await w.submit("asample", sample_body(base_model=NULL_MODEL) | {"num_samples": 1})
        for _ in range(100):
            if engine.sample_calls:
                break
            await asyncio.sleep(0.01)
        big = [
            await w.submit("asample", sample_body(base_model=NULL_MODEL) | {"num_samples": 100})
            for _ in range(4)
        ]
        engine.sample_gate.set()
        await asyncio.gather(*(w.result(f) for f in [blocker, *big]))
        assert engine.sample_calls == [1, 2, 2]

    wire_test(srv, body)


# ------------------------------------------------------------------------------------------------ store


def test_checkpoints_survive_a_restart_on_the_same_store(server_factory: Factory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = server_factory(store=store)

    async def before(w: Wire) -> tuple[str, str, str]:
        model_id = await w.create()
        await w.call("optim_step", adam_body(model_id))
        training = (await w.call("save_weights", {"model_id": model_id, "path": "s1"}))["path"]
        sampler = (await w.call("save_weights_for_sampler", {"model_id": model_id, "path": "s1"}))["path"]
        return model_id, training, sampler

    model_id, training, sampler = wire_test(first, before)
    first.close()
    (store / "tmp" / "save-crashed").mkdir(parents=True)  # what a crash mid-save leaves behind
    (store / "tmp" / "save-crashed" / "adapter_model.safetensors").write_bytes(b"partial")
    second = server_factory(store=store)
    assert list((store / "tmp").iterdir()) == []  # cleaned on start

    async def after(w: Wire) -> None:
        status, runs = await w.get("training_runs")
        assert [r["training_run_id"] for r in runs["training_runs"]] == [model_id]
        assert runs["training_runs"][0]["last_checkpoint"]["checkpoint_path"] == training
        status, ckpts = await w.get(f"training_runs/{model_id}/checkpoints")
        assert sorted(c["checkpoint_path"] for c in ckpts["checkpoints"]) == sorted([training, sampler])
        status, out = await w.post("forward", fwd_body(model_id))
        assert status == 404 and "create_training_client_from_state" in out["message"], out
        status, info = await w.post("get_info", {"model_id": model_id})
        assert status == 200 and info["model_name"] == NULL_MODEL
        # resume as create_training_client_from_state does: a new model, then load_weights
        resumed = await w.create(NULL_MODEL, rank=4)
        assert (await w.call("load_weights", {"model_id": resumed, "path": training}))["path"] == training
        assert (await w.call("forward", fwd_body(resumed)))["metrics"]["step:max"] == 1  # the step came back
        # the SDK's own path form names the same checkpoint
        sdk_form = f"hpcai://{model_id}/training/s1"
        assert (await w.call("load_weights", {"model_id": resumed, "path": sdk_form}))["path"] == sdk_form
        out = await w.call("asample", sample_body(model_path=sampler))
        assert len(out["sequences"]) == 2
        other_rank = await w.create(NULL_MODEL, rank=8)
        status, out = await w.post("load_weights", {"model_id": other_rank, "path": training})
        assert status == 400 and "rank 4" in out["message"]

    wire_test(second, after)


def test_saving_under_an_existing_name_replaces_it(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        one = await w.call("save_weights", {"model_id": model_id, "path": "same"})
        _, first = await w.get(f"training_runs/{model_id}/checkpoints")
        await w.call("optim_step", adam_body(model_id))
        two = await w.call("save_weights", {"model_id": model_id, "path": "same"})
        assert one == two
        _, second = await w.get(f"training_runs/{model_id}/checkpoints")
        assert len(second["checkpoints"]) == 1
        assert second["checkpoints"][0]["time"] > first["checkpoints"][0]["time"]
        fresh = await w.create()
        await w.call("load_weights", {"model_id": fresh, "path": one["path"]})
        assert (await w.call("forward", fwd_body(fresh)))["metrics"]["step:max"] == 1  # the newer contents
        out = await w.call("save_weights", {"model_id": model_id})  # no name: one is made up
        assert re.fullmatch(rf"hpcai://{model_id}/weights/auto-[\w-]+_training", out["path"]), out

    wire_test(null_server, body)


def test_archive_is_a_streamed_tar_gz_holding_the_safetensors(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        await w.call("save_weights_for_sampler", {"model_id": model_id, "path": "final"})
        url = f"/api/v1/training_runs/{model_id}/checkpoints/final_sampler/archive"
        headers = {**w.headers, "Accept": "application/gzip"}
        async with w.session.get(url, headers=headers) as resp:
            assert resp.status == 200 and resp.content_type == "application/gzip"
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            data = await resp.read()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            names = tar.getnames()
            assert "adapter_model.safetensors" in names and "meta.json" in names
            member = tar.extractfile("adapter_model.safetensors")
            assert member is not None
            on_disk = null_server.store.runs_dir / model_id / "checkpoints" / "final_sampler"  # type: ignore[union-attr]
            assert member.read() == (on_disk / "adapter_model.safetensors").read_bytes()
        async with w.session.get(url.replace("final_sampler", "final_training"), headers=headers) as resp:
            assert resp.status == 404 and "final_sampler" in (await resp.json())["message"]
        async with w.session.delete(
            f"/api/v1/training_runs/{model_id}/checkpoints/final_sampler", headers=w.headers
        ) as r:
            assert r.status == 204
        _, ckpts = await w.get(f"training_runs/{model_id}/checkpoints")
        assert ckpts["checkpoints"] == []
        async with w.session.delete(
            f"/api/v1/training_runs/{model_id}/checkpoints/final_sampler", headers=w.headers
        ) as r:
            assert r.status == 404

    wire_test(null_server, body)


def test_training_runs_listing_pages_newest_first(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        ids = [await w.create() for _ in range(5)]
        status, page = await w.get("training_runs?limit=2&offset=0")
        assert status == 200
        assert [r["training_run_id"] for r in page["training_runs"]] == ids[::-1][:2]
        assert page["cursor"] == {"offset": 0, "limit": 2, "total_count": 5}
        status, page = await w.get("training_runs?limit=2&offset=4")
        assert [r["training_run_id"] for r in page["training_runs"]] == [ids[0]]
        status, page = await w.get("training_runs")
        assert page["cursor"] == {"offset": 0, "limit": 20, "total_count": 5}
        status, one = await w.get(f"training_runs/{ids[2]}")
        assert status == 200 and one["training_run_id"] == ids[2] and one["model_owner"] == "local"
        assert one["last_checkpoint"] is None and one["corrupted"] is False

    wire_test(null_server, body)


# --------------------------------------------------------------------------------------------- lifecycle, CLI


def test_local_server_async_with_on_the_callers_loop() -> None:
    async def main() -> None:
        async with LocalServer(engine=NullEngine) as srv, ClientSession(srv.url) as session:
            w = Wire(session, srv)
            assert srv.url.startswith("http://127.0.0.1:") and srv.port > 0
            model_id = await w.create()
            # a long-poll in flight does not hold up shutdown
            future = await w.submit("forward", fwd_body(model_id))
            await w.result(future)
        assert srv.store is not None and not srv.store.root.exists()  # the temporary store is gone

    threads = threading.active_count()
    run(main)
    assert threading.active_count() == threads


def test_build_app_runs_under_aiohttp_run_app(tmp_path: Path) -> None:
    """The lifecycle (store, engine thread, scheduler) is the app's own: ``web.run_app`` serves it as is."""
    import socket

    from aiohttp import web

    from hpcai_async._loop import new_event_loop
    from hpcai_async.server.app import build_app

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = build_app(NullEngine, api_key="k", store=tmp_path / "store")
    loop = new_event_loop()

    def serve() -> None:
        web.run_app(app, sock=sock, handle_signals=False, print=None, loop=loop, shutdown_timeout=1)

    def stop() -> None:
        raise web.GracefulExit

    thread = threading.Thread(target=serve)
    thread.start()
    try:

        async def main() -> None:
            async with ClientSession(f"http://127.0.0.1:{port}") as session:
                for _ in range(100):  # until it listens (the engine is built first)
                    try:
                        async with session.get("/api/v1/healthz") as resp:
                            assert resp.status == 200
                            break
                    except OSError:
                        await asyncio.sleep(0.05)
                headers = {"X-API-Key": "k"}
                async with session.get("/api/v1/get_server_capabilities", headers=headers) as resp:
                    caps = await resp.json()
                assert (
                    caps["supported_models"][0]["model_name"] == NULL_MODEL and "seq_id" in caps["features"]
                )
                assert (tmp_path / "store").is_dir()

        run(main)
    finally:
        loop.call_soon_threadsafe(stop)
        thread.join(10)
    assert not thread.is_alive()


def test_shutdown_answers_waiting_long_polls(server_factory: Factory) -> None:
    engine = GatedEngine()
    srv = server_factory(engine=engine, long_poll_s=30)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        future = await w.submit("forward", fwd_body(model_id))
        poll = asyncio.ensure_future(w.poll(future["request_id"]))
        await asyncio.sleep(0.2)
        closing = asyncio.get_running_loop().run_in_executor(None, srv.close)
        await asyncio.sleep(0.2)
        engine.gate.set()  # the running engine call finishes; then the server stops
        t0 = time.monotonic()
        out = await poll
        assert out["type"] == "try_again" and time.monotonic() - t0 < 5
        await closing

    wire_test(srv, body)


def test_request_limits_are_configurable_and_checked() -> None:
    from hpcai_async.server.__main__ import main

    assert LocalServer().limits.max_body_bytes == 256 << 20  # the default: real batches fit, 1 GiB did not
    assert LocalServer(max_body_bytes=1 << 20).limits.max_body_bytes == 1 << 20
    with pytest.raises(ValueError, match="max_body_bytes"):
        LocalServer(max_body_bytes=0)
    assert main(["--max-body-mb", "0"]) == 2  # refused before anything starts


def test_cli_prints_url_and_key_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    code = "import sys; from hpcai_async.server.__main__ import main; sys.exit(main(sys.argv[1:]))"
    args = [
        sys.executable,
        "-c",
        code,
        "--port",
        "0",
        "--null",
        "--store",
        str(tmp_path / "s"),
        "--api-key",
        "k1",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        url_line = proc.stdout.readline().strip()
        key_line = proc.stdout.readline().strip()
        assert re.fullmatch(r"HPCAI_BASE_URL=http://127\.0\.0\.1:\d+", url_line), url_line
        assert key_line == "HPCAI_API_KEY=k1"
        url = url_line.split("=", 1)[1]

        async def check() -> None:
            async with (
                ClientSession(url) as session,
                session.get("/api/v1/get_server_capabilities", headers={"X-API-Key": "k1"}) as resp,
            ):
                assert resp.status == 200
                assert (await resp.json())["supported_models"][0]["model_name"] == NULL_MODEL

        run(check)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
