"""Sequence integrity on the client side: the Sequencer alone, then against a real local server.

Nothing applied twice, nothing skipped, and nothing waits for a number that will never be sent: a client
attached to a run continues its sequence; a conflict is a typed error, not a retry loop; a number reserved by
a request that fails before it is sent is released at once; the window keeps far-ahead ids off the wire.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from client_fixtures import HasURL, client, run, small_batch
from fault_proxy import FaultProxy

from hpcai_async import ConfigurationError, types
from hpcai_async._errors import IdempotencyConflictError, SequenceConflictError
from hpcai_async._sequence import Sequencer
from hpcai_async.training import TrainingClient

NULL_MODEL = "null/instant"
ADAM = types.AdamParams(learning_rate=1e-3)

# ------------------------------------------------------------------------------------------- the Sequencer


def test_numbers_are_reserved_in_call_order() -> None:
    seq = Sequencer()
    assert [seq.reserve(), seq.reserve(3), seq.reserve()] == [0, 1, 4]
    assert seq.reserved == 5


def test_turns_pass_in_order_and_an_abandoned_number_is_skipped() -> None:
    async def main() -> list[int]:
        seq = Sequencer()
        for _ in range(4):
            seq.reserve()
        went: list[int] = []

        async def request(n: int) -> None:
            await seq.wait_turn(n)
            went.append(n)
            seq.end_turn(n)

        tasks = [asyncio.create_task(request(n)) for n in (3, 2, 0)]  # 1 never comes ...
        await asyncio.sleep(0.01)
        assert went == [0]
        seq.abandon(1)  # ... and is given back: 2 and 3 go at once
        await asyncio.wait_for(asyncio.gather(*tasks), 1)
        return went

    assert run(main) == [0, 2, 3]


def test_the_window_holds_requests_until_the_ones_far_below_finish() -> None:
    async def main() -> None:
        seq = Sequencer(window=3)
        for _ in range(5):
            seq.reserve()
        assert [seq.in_window(n) for n in range(5)] == [True, True, True, False, False]
        waiting = asyncio.create_task(seq.wait_window(4))
        await asyncio.sleep(0.01)
        seq.finish(1)  # not the lowest: the window stays
        await asyncio.sleep(0.01)
        assert not waiting.done()
        seq.finish(0)  # 0 and 1 finished: the window is now [2, 5)
        await asyncio.wait_for(waiting, 1)
        seq.abandon(2)
        assert seq.in_window(5)

    run(main)


# ------------------------------------------------------------------------------------------- against a server


async def _steps(tc: TrainingClient) -> int:
    """The optimizer steps the null engine has applied to the run (its forward's ``step:max``)."""
    out = await (await tc.forward_async(small_batch(1)))
    return int(out.metrics["step:max"])


async def _train(tc: TrainingClient, steps: int) -> None:
    for _ in range(steps):
        fb = await tc.forward_backward_async(small_batch(2))
        opt = await tc.optim_step_async(ADAM)
        await fb
        await opt


def test_a_client_attached_to_a_run_continues_its_sequence(null_server: HasURL) -> None:
    """Before: the second client numbered from 1 again and got the first client's cached results."""

    async def main() -> None:
        async with client(null_server) as first:
            tc = await first.create_lora_training_client_async(NULL_MODEL)
            await _train(tc, 2)
            model_id = tc.model_id
        async with client(null_server) as second:  # a new process, as far as the server can tell
            attached = second.create_training_client(model_id)
            await _train(attached, 2)
            assert await _steps(attached) == 4
            info = await attached.get_info_async()
            assert info.model_id == model_id

    run(main)


def test_a_sequence_conflict_is_a_typed_error_that_is_not_retried(null_server: HasURL) -> None:
    async def main() -> None:
        async with client(null_server) as first:
            tc = await first.create_lora_training_client_async(NULL_MODEL)
            await _train(tc, 1)
        async with client(null_server) as second:
            # a client that wrongly starts the run's sequence again (what attaching did before the fix)
            stale = TrainingClient(second._transport, tc.model_id, NULL_MODEL, first_seq_id=1)
            started = time.monotonic()
            with pytest.raises(SequenceConflictError, match="seq_id"):
                await (await stale.forward_backward_async(small_batch(3, offset=7)))
            assert time.monotonic() - started < 5  # not retried for the 300 s budget

    run(main)


def test_a_token_id_that_cannot_be_sent_is_refused_before_a_number_is_taken(null_server: HasURL) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL)
            bad = types.Datum(
                model_input=types.ModelInput.from_ints([1, 10**30, 2]),
                loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [1.0, 1.0, 1.0]},
            )
            with pytest.raises(ConfigurationError, match=r"data\[0\]\.model_input\.chunks\[0\]\.tokens"):
                await tc.forward_backward_async([bad])
            assert tc._orders.seq.reserved == 0
            started = time.monotonic()
            await _train(tc, 1)
            assert time.monotonic() - started < 5

    run(main)


def test_a_request_that_fails_to_encode_releases_its_number_at_once(server_factory: Any) -> None:
    """The number was reserved; encoding fails on the way out. Before: the run stalled for the gap timeout."""
    srv = server_factory(seq_gap_timeout_s=30.0)

    async def main() -> None:
        async with client(srv) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL)
            bad = types.Datum(
                model_input=types.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(data=[1, 10**30, 3], dtype="int64"),
                    "weights": [1.0, 1.0, 1.0],
                },
            )
            failed = await tc.forward_backward_async([bad])
            after = await tc.optim_step_async(ADAM)  # reserved after the bad one: must not wait for it
            started = time.monotonic()
            with pytest.raises(ConfigurationError, match="cannot be encoded"):
                await failed
            await after
            assert time.monotonic() - started < 5
            assert await _steps(tc) == 1

    run(main)


def test_an_empty_batch_is_the_empty_result_and_sends_nothing(null_server: HasURL) -> None:
    """As with the official client: no chunks, no request, no sequence number; the empty output."""

    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL)
            before = (await tc.get_info_async()).next_seq_id
            for call in (tc.forward_backward_async, tc.forward_async):
                out = await (await call([]))
                assert (out.loss_fn_output_type, out.loss_fn_outputs, out.metrics) == ("", [], {})
            assert (await tc.get_info_async()).next_seq_id == before + 1  # only the get_info itself
            assert await _steps(tc) == 0

    run(main)


def test_far_more_requests_than_the_window_all_run_in_order(null_server: HasURL) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL)
            tc._orders.seq.window = 16  # a small window, so that it is crossed many times over
            futures = [await tc.optim_step_async(ADAM) for _ in range(100)]
            results = await asyncio.gather(*futures)
            assert [r.metrics["step:max"] for r in results] == list(range(1, 101))

    run(main)


def test_an_idempotency_key_reused_with_another_body_is_a_typed_error(null_server: HasURL) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            transport = service._transport
            await service.get_server_capabilities_async()  # binds the client to this loop
            lora = types.LoraConfig(rank=4)
            body = types.CreateModelRequest(base_model=NULL_MODEL, lora_config=lora)
            await transport.call("POST", "create_model", body=body, key="key-1")
            other = types.CreateModelRequest(base_model=NULL_MODEL, lora_config=types.LoraConfig(rank=8))
            started = time.monotonic()
            with pytest.raises(IdempotencyConflictError) as info:
                await transport.call("POST", "create_model", body=other, key="key-1")
            assert info.value.status == 409 and info.value.code == "idempotency_conflict"
            assert time.monotonic() - started < 5  # not retried

    run(main)


def test_the_client_never_sends_a_seq_id_beyond_the_servers_window(null_server: HasURL) -> None:
    """The first request is held up on the way; the 1,100 called after it must not run past the window."""
    with FaultProxy(null_server.url) as proxy:

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL)
                proxy.inject("optim_step", "delay", delay=1.0)  # the first optim_step arrives late
                futures = [await tc.optim_step_async(ADAM) for _ in range(1100)]
                results = await asyncio.gather(*futures)
                assert [r.metrics["step:max"] for r in results] == list(range(1, 1101))

        run(main, timeout=60)
