"""Turn-taking against a server without ``seq_id`` (the hosted dialect): call order on the wire, each request
sent once the one before it was answered, chunks combined, and a caller cancelled in the middle of its POST.

In turn mode the client sends a request's POST from the caller's own task when it is that request's turn
(``RunRequests.submit``); these tests pin what that must keep: the idempotency keys ``{session}:{client}:{n}``
in call order, one result per call, and a request that was called is sent even if its caller is cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from client_fixtures import client, run, small_batch
from fault_proxy import FaultProxy

from hpcai_async import BadRequestError, types
from hpcai_async.training import TrainingClient

NULL_MODEL = "null/instant"
ADAM = types.AdamParams(learning_rate=1e-3)
SUBMITS = ("forward", "forward_backward", "optim_step")


@pytest.fixture
def hosted(server_factory: Any) -> Any:
    return server_factory(dialect="hosted")


async def _steps(tc: TrainingClient) -> int:
    out = await (await tc.forward_async(small_batch(1)))
    return int(out.metrics["step:max"])


def _submit_keys(proxy: FaultProxy, prefix: str) -> list[str]:
    keys = [r.headers["x-idempotency-key"] for r in proxy.requests if r.endpoint in SUBMITS]
    return [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]


def test_pipelined_calls_go_in_call_order_each_after_the_one_before(hosted: Any) -> None:
    with FaultProxy(hosted.url) as proxy:

        async def main() -> None:
            async with client(hosted, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL)
                assert not service._transport.seq_mode
                futures: list[Any] = []
                for _ in range(20):
                    futures.append(await tc.forward_backward_async(small_batch(2)))
                    futures.append(await tc.optim_step_async(ADAM))
                results = await asyncio.gather(*futures)
                assert [r.metrics["step:max"] for r in results[1::2]] == list(range(1, 21))
                assert all(len(r.loss_fn_outputs) == 2 for r in results[0::2])
                prefix = f"{service._transport.session_id}:{tc._orders._index}:"
                assert _submit_keys(proxy, prefix) == [str(n) for n in range(40)]
                assert tc._orders.seq.idle

        run(main)


def test_a_batch_of_several_chunks_is_sent_in_order_and_combined(hosted: Any) -> None:
    with FaultProxy(hosted.url) as proxy:

        async def main() -> None:
            async with client(hosted, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL)
                data = small_batch(300)  # three chunks of at most 128 datums
                out = await (await tc.forward_backward_async(data))
                step = await tc.optim_step_async(ADAM)
                assert len(out.loss_fn_outputs) == 300
                assert (await step).metrics["step:max"] == 1
                prefix = f"{service._transport.session_id}:{tc._orders._index}:"
                assert _submit_keys(proxy, prefix) == ["0", "1", "2", "3"]
                assert proxy.endpoints("POST").count("forward_backward") == 3

        run(main)


def test_a_caller_cancelled_during_its_post_still_has_it_sent_in_its_turn(hosted: Any) -> None:
    """The first optim_step's POST is held up; its caller is cancelled meanwhile. The step must still be
    applied, exactly once, and before the one called after it (sent again with the same key if need be)."""
    with FaultProxy(hosted.url) as proxy:

        async def main() -> None:
            async with client(hosted, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL)
                proxy.inject("optim_step", "delay", delay=0.5)
                caller = asyncio.create_task(tc.optim_step_async(ADAM))
                await asyncio.sleep(0.2)  # its POST is on the way, held by the proxy
                caller.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await caller
                second = await (await tc.optim_step_async(ADAM))
                assert second.metrics["step:max"] == 2  # the cancelled call's step came first
                assert await _steps(tc) == 2  # and it was applied once
                prefix = f"{service._transport.session_id}:{tc._orders._index}:"
                keys = _submit_keys(proxy, prefix)
                assert keys[0] == "0" and keys[-2:] == ["1", "2"] and set(keys[:-2]) == {"0"}

        run(main)


def test_a_request_the_server_refuses_fails_on_its_future_and_passes_its_turn(hosted: Any) -> None:
    async def main() -> None:
        async with client(hosted) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL)
            bad = types.Datum(
                model_input=types.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(data=[1, 10**30, 3], dtype="int64"),
                    "weights": [1.0, 1.0, 1.0],
                },
            )
            failed = await tc.forward_backward_async([bad])  # a 400: the error is the future's, as before
            after = await tc.optim_step_async(ADAM)
            with pytest.raises(BadRequestError, match="int64"):
                await failed
            assert (await after).metrics["step:max"] == 1
            assert tc._orders.seq.idle

    run(main)
