"""The scheduler over a long life: failures finish their futures, state stays bounded, waits clean up.

Each test runs a real ``LocalServer`` on 127.0.0.1 (NullEngine, or a NullEngine that fails on purpose) and
talks to it with raw requests (test_server.py's ``Wire``); where the state that must stay bounded is not
visible on the wire, the test reads the server's scheduler."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from test_server import Factory, GatedEngine, Wire, adam_body, fb_body, fwd_body, sample_body, wire_test

from hpcai_async import types
from hpcai_async.server import NULL_MODEL, LocalServer, NullEngine, ordering


class DeviceLost(BaseException):
    """Not an Exception: what a C extension or a ``sys.exit`` deep in an engine could raise."""


class LosingEngine(GatedEngine):
    """GatedEngine whose forward_backward and sample raise ``DeviceLost``."""

    def forward_backward(self, run_id: str, data: Any, loss_fn: str) -> types.ForwardBackwardOutput:
        raise DeviceLost("the device fell off the bus")

    def sample(self, jobs: Any) -> list[types.SampleResponse]:
        raise DeviceLost("the device fell off the bus")


def test_a_base_exception_fails_its_job_and_not_the_rest_of_the_group(server_factory: Factory) -> None:
    engine = LosingEngine()
    srv = server_factory(engine=lambda: engine)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        hold = await w.submit("forward", fwd_body(model_id))  # holds the device; the next three queue up
        futures = [
            await w.submit("forward_backward", fb_body(model_id)),
            await w.submit("optim_step", adam_body(model_id)),
            await w.submit("forward", fwd_body(model_id)),
        ]
        engine.gate.set()
        await w.result(hold, deadline=10)
        failed, step, after = [await w.result(f, deadline=10) for f in futures]
        assert failed["error"] == "InternalServerError" and "DeviceLost" in failed["message"], failed
        assert step["metrics"]["step:max"] == 1 and after["metrics"]["step:max"] == 1
        out = await w.call("forward", fwd_body(model_id))  # the device queue goes on
        assert out["metrics"]["step:max"] == 1

    wire_test(srv, body)


def test_a_base_exception_in_sampling_fails_that_batch_and_the_queue_goes_on(server_factory: Factory) -> None:
    srv = server_factory(engine=LosingEngine)

    async def body(w: Wire) -> None:
        out = await w.call("asample", sample_body(base_model=NULL_MODEL))
        assert out["error"] == "InternalServerError" and "DeviceLost" in out["message"], out
        model_id = await w.create()  # the worker is still there
        assert (await w.call("optim_step", adam_body(model_id)))["metrics"]["step:max"] == 1

    wire_test(srv, body, timeout=20)


class Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise RuntimeError("and this one neither")


class UnprintableEngine(NullEngine):
    def optim_step(self, run_id: str, adam: types.AdamParams) -> types.OptimStepResponse:
        raise Unprintable


def test_an_exception_that_cannot_be_shown_still_finishes_its_job(server_factory: Factory) -> None:
    srv = server_factory(engine=UnprintableEngine)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        out = await w.result(await w.submit("optim_step", adam_body(model_id)), deadline=5)
        assert out["error"] == "InternalServerError" and "Unprintable" in out["message"], out

    wire_test(srv, body)


def test_ended_models_are_forgotten_beyond_a_bound(server_factory: Factory) -> None:
    srv = server_factory(retention_s=0.2)  # the reaper then runs every 0.1 s
    srv.scheduler.max_ended_models = 2

    async def body(w: Wire) -> None:
        ids = [await w.create() for _ in range(4)]
        for model_id in ids[:3]:
            assert (await w.call("unload_model", {"model_id": model_id}))["type"] == "unload_model"
        end = time.monotonic() + 5
        while len(srv.scheduler.models) > 3 and time.monotonic() < end:  # noqa: ASYNC110 (another thread's state)
            await asyncio.sleep(0.05)
        assert list(srv.scheduler.models) == ids[1:]  # the oldest ended model went; the live one stays
        status, out = await w.post("forward", fwd_body(ids[0]))
        assert status == 404 and "not loaded (unloaded" in out["message"], out  # still a clear answer
        status, out = await w.post("forward", fwd_body(ids[1]))
        assert status == 404 and "unloaded" in out["message"], out

    wire_test(srv, body)


def test_rejected_seq_ids_are_remembered_within_a_bound(
    null_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ordering, "MAX_REJECTED_KEPT", 4)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        for seq in range(1, 11):
            status, _ = await w.post("forward_backward", fb_body(model_id, [], seq_id=seq))
            assert status == 400
        rejected = srv_model(null_server, model_id).order.rejected
        assert list(rejected) == [7, 8, 9, 10]
        status, out = await w.post("forward_backward", fb_body(model_id, [], seq_id=10))  # a retry
        assert status == 400 and "data" in out["message"], out
        assert (await w.call("optim_step", adam_body(model_id, seq_id=11)))["metrics"]["step:max"] == 1

    wire_test(null_server, body)


def srv_model(srv: LocalServer, model_id: str) -> Any:
    return srv.scheduler.models[model_id]


def test_a_cancelled_long_poll_leaves_no_task_and_no_waiter(server_factory: Factory) -> None:
    engine = GatedEngine()
    srv = server_factory(engine=lambda: engine)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        held = await w.submit("forward", fwd_body(model_id))
        record = srv.scheduler.get(held["request_id"])

        async def cancel_a_wait() -> tuple[int, int]:
            before = len(asyncio.all_tasks())
            wait = asyncio.ensure_future(srv.scheduler.wait(record, 30, until=asyncio.Event()))
            await asyncio.sleep(0.01)
            wait.cancel()
            with pytest.raises(asyncio.CancelledError):
                await wait
            await asyncio.sleep(0)  # let the cancelled helper finish
            return before, len(asyncio.all_tasks())

        assert srv._thread_loop is not None
        done = asyncio.run_coroutine_threadsafe(cancel_a_wait(), srv._thread_loop)
        before, after = await asyncio.wrap_future(done)
        assert after == before and not record.waiters
        engine.gate.set()
        assert "metrics" in await w.result(held)

    wire_test(srv, body)
