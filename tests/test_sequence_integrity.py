"""Sequence integrity at the wire level: nothing applied twice, nothing skipped, no run stalled or broken.

Raw aiohttp requests to a real ``LocalServer`` on 127.0.0.1 (the ``Wire`` helper of test_server.py), on
``NullEngine``: its ``step:max`` counts the optimizer steps that ran before a request, so each test sees
exactly which requests were applied. The client's side of the same contracts (a TrainingClient attaching to a
run, releasing unsent ids, the typed conflict errors) is tested end to end with the client."""

from __future__ import annotations

import time
from typing import Any

from test_server import Factory, Wire, adam_body, ce_datum, fb_body, fwd_body, wire_test

from hpcai_async.server import LocalServer
from hpcai_async.server.ordering import SEQ_WINDOW


async def next_seq_id(w: Wire, model_id: str) -> Any:
    status, info = await w.post("get_info", {"model_id": model_id})  # no seq_id: it takes no turn
    assert status == 200, info
    return info["next_seq_id"]


async def steps(w: Wire, model_id: str) -> float:
    """The optimizer steps applied so far (a forward without seq_id runs after everything released)."""
    return float((await w.call("forward", fwd_body(model_id)))["metrics"]["step:max"])


def test_get_info_tells_where_the_sequence_is(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        assert await next_seq_id(w, model_id) == 1  # the first request after create_model carries 1
        await w.call("forward_backward", fb_body(model_id, seq_id=1))
        await w.call("optim_step", adam_body(model_id, seq_id=2))
        status, info = await w.post("get_info", {"model_id": model_id, "seq_id": 3})  # takes its turn
        assert status == 200 and info["next_seq_id"] == 4, info
        await w.submit("optim_step", adam_body(model_id, seq_id=5))  # waits for 4: the run is still at 4
        assert await next_seq_id(w, model_id) == 4

    wire_test(null_server, body)


def test_the_hosted_dialect_sends_no_next_seq_id(server_factory: Factory) -> None:
    srv = server_factory(dialect="hosted")

    async def body(w: Wire) -> None:
        assert await next_seq_id(w, await w.create()) is None

    wire_test(srv, body)


def test_a_second_client_continues_the_run_from_next_seq_id(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        for seq in range(1, 5):  # the first client: 2 steps, seq_id 1..4
            path, req = ("forward_backward", fb_body) if seq % 2 else ("optim_step", adam_body)
            await w.call(path, req(model_id, seq_id=seq))
        assert await steps(w, model_id) == 2
        first = await next_seq_id(w, model_id)  # a new process attaches: it asks where the run is
        assert first == 5
        for seq in range(first, first + 8):  # and trains 4 more steps
            path, req = ("forward_backward", fb_body) if seq % 2 else ("optim_step", adam_body)
            out = await w.call(path, req(model_id, seq_id=seq))
            assert "error" not in out, out
        assert await steps(w, model_id) == 6

    wire_test(null_server, body)


def test_a_replayed_seq_id_answers_the_original_or_a_typed_409(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        first = await w.submit("optim_step", adam_body(model_id, seq_id=1))
        original = await w.result(first)
        again = await w.submit("optim_step", adam_body(model_id, seq_id=1))  # a retry: the same request
        assert again["request_id"] == first["request_id"] and await w.result(again) == original
        async with w.session.post(
            "/api/v1/forward", json=fwd_body(model_id, seq_id=1), headers=w.headers
        ) as resp:  # a second client numbering from 1 again, with other data
            out = await resp.json()
            assert resp.status == 409 and resp.headers["x-should-retry"] == "false", out
        assert out["error"] == "ConflictError" and out["code"] == "sequence_conflict", out
        assert "seq_id 1" in out["message"] and "different request" in out["message"], out
        assert await steps(w, model_id) == 1  # applied once; the conflicting request did not run

    wire_test(null_server, body)


def test_a_reused_idempotency_key_is_a_typed_409_not_retried(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        key = {"X-Idempotency-Key": "proc-a:0:1", **w.headers}
        await w.submit("optim_step", adam_body(model_id), headers=key)
        async with w.session.post("/api/v1/forward", json=fwd_body(model_id), headers=key) as resp:
            out = await resp.json()
            assert resp.status == 409 and resp.headers["x-should-retry"] == "false", out
        assert out["code"] == "idempotency_conflict" and "proc-a:0:1" in out["message"], out

    wire_test(null_server, body)


def test_release_seq_lets_the_next_request_run_at_once(server_factory: Factory) -> None:
    srv = server_factory(seq_gap_timeout_s=30)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        waiting = await w.submit("optim_step", adam_body(model_id, seq_id=2))
        t0 = time.monotonic()
        status, out = await w.post("release_seq", {"model_id": model_id, "seq_id": 1})
        assert status == 200 and out == {}
        assert (await w.result(waiting))["metrics"]["step:max"] == 1
        assert time.monotonic() - t0 < 5  # not the 30 s gap timeout
        for seq in (1, 2):  # idempotent, and an id already received is left alone
            assert await w.post("release_seq", {"model_id": model_id, "seq_id": seq}) == (200, {})
        assert await next_seq_id(w, model_id) == 3
        status, out = await w.post("optim_step", adam_body(model_id, seq_id=1))  # a released id is used
        assert status == 409 and out["code"] == "sequence_conflict", out
        assert await steps(w, model_id) == 1

    wire_test(srv, body)


def test_release_seq_says_what_is_wrong(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        status, out = await w.post("release_seq", {"model_id": "no-such-model", "seq_id": 1})
        assert status == 404 and "no-such-model" in out["message"], out
        status, out = await w.post("release_seq", {"model_id": model_id, "seq_id": 0})
        assert status == 400 and "seq_id" in out["message"], out
        status, out = await w.post("release_seq", {"model_id": model_id, "seq_id": SEQ_WINDOW + 5})
        assert status == 400 and out["code"] == "seq_out_of_window", out
        assert await next_seq_id(w, model_id) == 1

    wire_test(null_server, body)


def test_a_far_ahead_seq_id_is_refused_and_the_sequence_is_unchanged(server_factory: Factory) -> None:
    srv = server_factory(seq_gap_timeout_s=30)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        await w.call("optim_step", adam_body(model_id, seq_id=1))
        for path, req in (
            ("optim_step", adam_body(model_id, seq_id=2 + SEQ_WINDOW + 1)),
            ("get_info", {"model_id": model_id, "seq_id": 10**9}),
            ("forward_backward", fb_body(model_id, [ce_datum([1])], seq_id=10**6)),  # bad too: no turn
        ):
            status, out = await w.post(path, req)
            assert status == 400 and out["code"] == "seq_out_of_window", out
            assert str(SEQ_WINDOW) in out["message"] and "unchanged" in out["message"], out
        assert await next_seq_id(w, model_id) == 2
        t0 = time.monotonic()
        assert (await w.call("optim_step", adam_body(model_id, seq_id=2)))["metrics"]["step:max"] == 2
        assert time.monotonic() - t0 < 5  # the next id runs at once: nothing was taken as a gap
        status, out = await w.post("optim_step", adam_body(model_id, seq_id=3 + SEQ_WINDOW + 1))
        assert status == 400 and out["code"] == "seq_out_of_window", out
        status, out = await w.post("optim_step", adam_body(model_id, seq_id=3 + SEQ_WINDOW))  # the edge
        assert status == 200 and "request_id" in out, out  # accepted: it waits for its turn

    wire_test(srv, body)


def test_one_stray_seq_id_does_not_break_the_run(server_factory: Factory) -> None:
    srv = server_factory(seq_gap_timeout_s=0.3)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        for seq in (1, 2):
            await w.call("optim_step", adam_body(model_id, seq_id=seq))
        stray = await w.submit("optim_step", adam_body(model_id, seq_id=1000))  # inside the window
        out = await w.result(stray)  # fails once the gap (3..999) times out ...
        assert out["error"] == "BadRequestError" and "never arrived" in out["message"], out
        assert "continues with seq_id 3" in out["message"], out
        assert await next_seq_id(w, model_id) == 3  # ... and the run's sequence did not move
        for seq in (3, 4):
            out = await w.call("optim_step", adam_body(model_id, seq_id=seq))
            assert out["metrics"]["step:max"] == seq, out  # the stray never ran; the run goes on

    wire_test(srv, body)


def test_a_lost_request_skips_it_and_the_ones_behind_it(server_factory: Factory) -> None:
    srv = server_factory(seq_gap_timeout_s=0.3)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        waiting = [await w.submit("optim_step", adam_body(model_id, seq_id=s)) for s in (2, 3)]
        for future in waiting:
            assert "continues with seq_id 4" in (await w.result(future))["message"]
        assert await next_seq_id(w, model_id) == 4

    wire_test(srv, body)


def test_a_request_rejected_with_a_server_error_passes_its_turn(server_factory: Factory) -> None:
    srv = server_factory(seq_gap_timeout_s=30)

    async def body(w: Wire) -> None:
        model_id = await w.create()
        bad = fb_body(model_id, [ce_datum([1, 2, 3])], seq_id=1)
        bad["forward_backward_input"]["data"][0]["loss_fn_inputs"]["target_tokens"]["data"] = [2**63, 1]
        status, out = await w.post("forward_backward", bad)  # int64 overflow while preparing the batch
        assert status >= 400, out
        t0 = time.monotonic()
        assert (await w.call("optim_step", adam_body(model_id, seq_id=2)))["metrics"]["step:max"] == 1
        assert time.monotonic() - t0 < 5  # seq_id 1's turn passed: no wait for the gap timeout
        assert await w.post("forward_backward", bad) == (status, out)  # the same request: the same answer

    wire_test(srv, body)
