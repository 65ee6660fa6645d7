"""TrainingClient against a real local server: ordering, pipelining, chunking, custom losses, tokenizers.

Execution order is read from the results: the null engine's ``step:max`` in a forward result is the number of
optimizer steps that ran before it, so it must equal the number of ``optim_step`` calls made before it.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Any

import msgspec
import numpy as np
import pytest
from client_fixtures import LOOPS, PLAIN_CAPABILITIES, HasURL, client, datum, run, small_batch
from fault_proxy import FaultProxy

from hpcai_async import APIFuture, TrainingClient, types

NULL_MODEL = "null/instant"
BUILTIN = "hpcai-async/tiny-qwen3"


async def interleaved_calls(tc: TrainingClient, calls: int = 100, workers: int = 4) -> None:
    """``calls`` forward_backward / optim_step calls from ``workers`` coroutines at once; check the order."""
    order: list[tuple[str, APIFuture]] = []  # (kind, future) in call order

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(calls // workers):
            if rng.random() < 0.5:
                kind, fut = "fb", tc.forward_backward_async(small_batch(1), "cross_entropy")
            else:
                kind, fut = "opt", tc.optim_step_async(types.AdamParams(learning_rate=1e-3))
            # the id is taken when the coroutine starts: record the call order at that same moment
            task = asyncio.ensure_future(fut)
            order.append((kind, task))  # type: ignore[arg-type]
            await asyncio.sleep(0)
            await task
            await asyncio.sleep(rng.random() * 0.002)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    steps_before = 0
    for kind, task in order:
        result = await (await task)  # type: ignore[misc]
        if kind == "opt":
            steps_before += 1
            assert result.metrics["step:max"] == steps_before
        else:
            assert result.metrics["step:max"] == steps_before


@pytest.mark.parametrize("loop", LOOPS)
def test_100_interleaved_calls_run_in_call_order_with_seq_ids(null_server: HasURL, loop: str) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            await interleaved_calls(tc)

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_100_interleaved_calls_keep_call_order_on_the_wire_without_seq_ids(
    null_server: HasURL, loop: str
) -> None:
    with FaultProxy(null_server.url) as proxy:
        proxy.inject("get_server_capabilities", "status", status=200, body=PLAIN_CAPABILITIES)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                await interleaved_calls(tc)

        run(main, loop)
    keys = [
        r.headers["x-idempotency-key"]
        for r in proxy.requests
        if r.endpoint in ("forward_backward", "optim_step")
    ]
    assert [int(k.rsplit(":", 1)[1]) for k in keys] == list(range(100))  # arrival order = call order


def test_sync_calls_return_at_once_and_keep_order(null_server: HasURL) -> None:
    with client(null_server) as service:
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)
        futures = []
        for i in range(40):
            if i % 3 == 2:
                futures.append(("opt", tc.optim_step(types.AdamParams())))
            else:
                futures.append(("fb", tc.forward_backward(small_batch(1))))
        steps = 0
        for kind, fut in futures:
            result = fut.result(timeout=30)
            steps += kind == "opt"
            assert result.metrics["step:max"] == steps


def test_requests_are_pipelined_not_waiting_for_results(null_server: HasURL) -> None:
    """Results are held back 0.5 s by the proxy; submitting forward_backward + optim_step takes far less."""
    with FaultProxy(null_server.url) as proxy:
        proxy.inject("get_server_capabilities", "status", status=200, body=PLAIN_CAPABILITIES)  # turn-taking

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                proxy.inject("retrieve_future", "delay", delay=0.5, times=1000)
                start = time.monotonic()
                fb = await tc.forward_backward_async(small_batch(2))
                opt = await tc.optim_step_async(types.AdamParams())
                submitted = time.monotonic() - start
                assert not fb.done() and not opt.done()
                assert (await fb).metrics["step:max"] == 0
                assert (await opt).metrics["step:max"] == 1
                assert submitted < 0.4, submitted

        run(main)


def _batched_items(proxy: FaultProxy, *paths: str) -> list[tuple[str, str]]:
    """(path, idempotency key) of every request to ``paths`` that the proxy saw inside a POST batch."""
    items = []
    for r in proxy.find("batch"):
        decode = msgspec.msgpack.decode if "msgpack" in r.headers["content-type"] else msgspec.json.decode
        items += [(i["path"], i["idempotency_key"]) for i in decode(r.body)["requests"] if i["path"] in paths]
    return items


# Our server's extensions less "inline_result": every result is polled, and the polls are batched too.
BATCH_WITHOUT_INLINE = (
    b'{"supported_models": [{"model_name": "null/instant"}], '
    b'"features": ["seq_id", "msgpack", "long_poll", "load_optimizer", "batch"]}'
)


@pytest.mark.parametrize("mode", ["inline", "polled", "batch lost"])
def test_a_burst_of_calls_goes_out_in_a_few_batches_in_order_and_once(null_server: HasURL, mode: str) -> None:
    """200 pipelined calls: a few HTTP requests; each runs once, in call order, even if a batch is lost."""
    with FaultProxy(null_server.url) as proxy:
        if mode == "batch lost":  # the server runs the first batch, the client never sees the answer
            proxy.inject("/api/v1/batch", "reset", after=True)
        if mode == "polled":
            proxy.inject("get_server_capabilities", "status", status=200, body=BATCH_WITHOUT_INLINE)

        async def main() -> list[Any]:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                futures = []
                for _ in range(100):
                    futures.append(await tc.forward_backward_async(small_batch(1), "cross_entropy"))
                    futures.append(await tc.optim_step_async(types.AdamParams(learning_rate=1e-3)))
                return await asyncio.gather(*futures)

        results = run(main)
    assert [r.metrics["step:max"] for r in results[0::2]] == list(range(100))
    assert [r.metrics["step:max"] for r in results[1::2]] == list(range(1, 101))
    calls = ("forward_backward", "optim_step")
    single = [(r.endpoint, r.headers["x-idempotency-key"]) for r in proxy.requests if r.endpoint in calls]
    batched = _batched_items(proxy, *calls)
    keys = {key for _, key in single + batched}
    assert len(keys) == 200  # every call went out, under its own key
    if mode == "batch lost":  # its requests went again, and the server ran each once (the step counts above)
        assert len(single) + len(batched) > 200
        return
    assert len(single) + len(batched) == 200
    assert len(single) <= 2 * 2  # a submit slot is freed at most twice before the rest go in batches
    polls = _batched_items(proxy, "retrieve_future")
    if mode == "polled":  # 200 results fetched with a few HTTP requests
        assert len(polls) + len(proxy.find("retrieve_future")) >= 200
    assert len(proxy.requests) <= 200, len(proxy.requests)  # one request per submit and poll: 400


def test_chunking_end_to_end(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                data = [datum(np.arange(4) + i) for i in range(129)]
                result = await (await tc.forward_backward_async(data))
                assert len(result.loss_fn_outputs) == 129
                assert result.metrics["num_examples:sum"] == 129
                assert [o["logprobs"].size for o in result.loss_fn_outputs] == [3] * 129
                # three datums of 60 000 tokens (180 000 numbers each): two fit in 500 000, the third does not
                big = [datum(np.arange(60_001) % 1000) for _ in range(3)]
                result = await (await tc.forward_async(big))
                assert result.metrics["num_examples:sum"] == 3
                assert [o["logprobs"].size for o in result.loss_fn_outputs] == [60_000] * 3

        run(main)
    fb = proxy.find("forward_backward")
    sizes = [_datum_count(r.body, r.headers["content-type"], "forward_backward_input") for r in fb]
    assert sorted(sizes) == [1, 128]  # chunks go out concurrently with seq_ids: the server orders them
    keys = [r.headers["x-idempotency-key"].rsplit(":", 1)[1] for r in fb]
    assert sorted(keys) == ["0", "1"]  # each chunk has its own sequence number
    assert sorted(
        _datum_count(r.body, r.headers["content-type"], "forward_input") for r in proxy.find("forward")
    ) == [1, 2]


def _datum_count(body: bytes, content_type: str, field: str) -> int:
    import msgspec

    decoded = msgspec.msgpack.decode(body) if content_type == "application/msgpack" else json.loads(body)
    return len(decoded[field]["data"])


def test_state_round_trip_and_clients_from_state(null_server: HasURL) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            for _ in range(3):
                await tc.forward_backward_async(small_batch(1))
                await tc.optim_step_async(types.AdamParams())
            saved = await (await tc.save_state_async("three"))
            assert saved.path == f"hpcai://{tc.model_id}/weights/three_training"
            sampler_path = (await (await tc.save_weights_for_sampler_async("three"))).path
            assert sampler_path == f"hpcai://{tc.model_id}/sampler_weights/three_sampler"

            resumed = await service.create_training_client_from_state_with_optimizer_async(saved.path)
            assert resumed.model_id != tc.model_id
            assert (await (await resumed.forward_async(small_batch(1)))).metrics["step:max"] == 3
            weights_only = await service.create_training_client_from_state_async(sampler_path)
            assert (await (await weights_only.forward_async(small_batch(1)))).metrics["step:max"] == 0

            sampler = await tc.save_weights_and_get_sampling_client_async("four")
            assert sampler.model_path == f"hpcai://{tc.model_id}/sampler_weights/four_sampler"
            assert sampler.base_model == NULL_MODEL
            prompt, params = types.ModelInput.from_ints([1, 2]), types.SamplingParams(max_tokens=3)
            response = await sampler.sample_async(prompt, 2, params)
            assert [len(s.tokens) for s in response.sequences] == [3, 3]

            info = await tc.get_info_async()
            assert info.model_id == tc.model_id and info.model_data.model_name == NULL_MODEL
            unloaded = await (await tc.unload_model_async())
            assert unloaded.model_id == tc.model_id

    run(main)


@pytest.mark.parametrize("advertised", [False, True])
def test_the_optimizer_flag_is_sent_only_when_advertised(null_server: HasURL, advertised: bool) -> None:
    """load_state[_with_optimizer] send ``optimizer`` only to a server that lists "load_optimizer"."""
    features = ["seq_id", "load_optimizer"] if advertised else []
    caps = json.dumps({"supported_models": [{"model_name": NULL_MODEL}], "features": features}).encode()
    with FaultProxy(null_server.url) as proxy:
        proxy.inject("get_server_capabilities", "status", status=200, body=caps)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                await tc.optim_step_async(types.AdamParams())
                path = (await (await tc.save_state_async("one"))).path
                fresh = await service.create_training_client_from_state_async(path)
                step = (await (await fresh.forward_async(small_batch(1)))).metrics["step:max"]
                # the local server restores a training checkpoint's optimizer when not told otherwise
                assert step == (0 if advertised else 1)
                resumed = await service.create_training_client_from_state_with_optimizer_async(path)
                assert (await (await resumed.forward_async(small_batch(1)))).metrics["step:max"] == 1

        run(main)
    flags = [json.loads(r.body).get("optimizer", "absent") for r in proxy.find("load_weights")]
    assert flags == ([False, True] if advertised else ["absent", "absent"])


def test_a_failed_request_raises_with_the_server_message(null_server: HasURL) -> None:
    from hpcai_async import APIError

    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            bad = types.Datum(
                model_input=types.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [1, 2], "weights": [1.0, 1.0]},  # wrong length
            )
            with pytest.raises(APIError) as info:
                await (await tc.forward_backward_async([bad]))
            assert "target_tokens" in str(info.value)
            # the client goes on: later requests still run, in order
            assert (await (await tc.optim_step_async(types.AdamParams()))).metrics["step:max"] == 1

    run(main)


# -------------------------------------------------------------------------------- real engine


def _tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 200, size=n)


def test_forward_backward_custom_equals_cross_entropy_with_weights_minus_grad(server: HasURL) -> None:
    """A custom loss puts exactly the gradient of a cross-entropy with weights -dL/dlogp on the model.

    Three runs from the same seed take one AdamW step each: (a) the custom loss through
    forward_backward_custom, (b) cross_entropy with weights = -dL/dlogp computed here directly in torch, (c)
    for the linear custom loss -sum(w * logp), plain cross_entropy with weights w. Their logprobs afterwards
    must agree.
    """
    import torch

    data = [datum(_tokens(9, 1)), datum(_tokens(7, 2), weights=[1, 1, 0, 1, 1, 0.5])]
    adam = types.AdamParams(learning_rate=5e-3)

    def nonlinear(
        batch: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum((lp.exp() * torch.arange(1, len(lp) + 1)).sum() for lp in logprobs)
        return loss, {"custom:sum": loss.detach()}  # a tensor metric is fine

    def linear(
        batch: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = -sum(
            (d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(batch, logprobs, strict=True)
        )
        return loss, {"ce:sum": loss.item()}

    async def main() -> None:
        async with client(server) as service:

            async def fresh() -> TrainingClient:
                return await service.create_lora_training_client_async(BUILTIN, rank=4, seed=7)

            custom, direct, custom_lin, plain = [await fresh() for _ in range(4)]
            before = await (await direct.forward_async(data))

            # (a) through the client
            out = await (await custom.forward_backward_custom_async(data, nonlinear))
            await custom.optim_step_async(adam)
            assert (
                "custom:sum" in out.metrics and "loss:mean" in out.metrics
            )  # the user's and the surrogate's
            assert len(out.loss_fn_outputs) == len(data)

            # (b) the gradient computed here, directly
            lps = [torch.tensor(o["logprobs"].to_numpy(), requires_grad=True) for o in before.loss_fn_outputs]
            loss, _ = nonlinear(data, lps)
            loss.backward()
            weighted = [
                types.Datum(
                    model_input=d.model_input,
                    loss_fn_inputs={
                        "target_tokens": d.loss_fn_inputs["target_tokens"],
                        "weights": (-lp.grad).numpy(),
                    },
                )
                for d, lp in zip(data, lps, strict=True)
            ]
            await direct.forward_backward_async(weighted)
            await direct.optim_step_async(adam)

            # (c) a linear custom loss is plain cross-entropy
            await custom_lin.forward_backward_custom_async(data, linear)
            await custom_lin.optim_step_async(adam)
            await plain.forward_backward_async(data)
            await plain.optim_step_async(adam)

            after = [await (await tc.forward_async(data)) for tc in (custom, direct, custom_lin, plain)]
            logprobs = [np.concatenate([o["logprobs"].to_numpy() for o in r.loss_fn_outputs]) for r in after]
            start = np.concatenate([o["logprobs"].to_numpy() for o in before.loss_fn_outputs])
            assert np.abs(logprobs[0] - start).max() > 1e-4  # the step changed the model ...
            np.testing.assert_allclose(logprobs[0], logprobs[1], atol=2e-4)  # ... as the direct gradient does
            np.testing.assert_allclose(logprobs[2], logprobs[3], atol=2e-4)

    run(main, timeout=120)


def test_custom_loss_ids_are_reserved_together(null_server: HasURL) -> None:
    """An optim_step called right after forward_backward_custom runs after both of its passes."""
    import torch

    def loss_fn(
        batch: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return sum(lp.sum() for lp in logprobs), {}

    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            custom = await tc.forward_backward_custom_async(small_batch(2), loss_fn)
            opt = await tc.optim_step_async(types.AdamParams())
            assert (await custom).metrics["step:max"] == 0  # the backward pass ran before the step
            assert (await opt).metrics["step:max"] == 1

    run(main)


@pytest.mark.parametrize("seq_ids", [True, False])
def test_a_failing_custom_loss_leaves_no_hole_in_the_sequence(null_server: HasURL, seq_ids: bool) -> None:
    """The backward pass's reserved ids are skipped (or filled, with seq_ids): later calls run at once."""

    def broken(batch: list[types.Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        raise ValueError("this loss is broken")

    with FaultProxy(null_server.url) as proxy:
        if not seq_ids:
            proxy.inject("get_server_capabilities", "status", status=200, body=PLAIN_CAPABILITIES)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                custom = await tc.forward_backward_custom_async(small_batch(2), broken)
                opt = await tc.optim_step_async(types.AdamParams())
                with pytest.raises(ValueError, match="this loss is broken"):
                    await custom
                assert (await opt).metrics["step:max"] == 1  # type: ignore[index]

        run(main, timeout=10)  # the server's gap timeout is 60 s: a hole would time this out


def test_get_tokenizer_of_the_builtin_model_without_torch(server: HasURL) -> None:
    with client(server) as service:
        tc = service.create_lora_training_client(BUILTIN, rank=4)
        tokenizer = tc.get_tokenizer()
        assert tc.get_tokenizer() is tokenizer  # cached per client
        ids = tokenizer.encode("Q: What color is the sky?\nA:")
        assert ids and tokenizer.decode(ids) == "Q: What color is the sky?\nA:"
        model_id = tc.model_id
    code = (
        "import sys; from hpcai_async import ServiceClient\n"
        f"with ServiceClient(base_url={server.url!r}, api_key={server.api_key!r}) as s:\n"
        f"    tok = s.create_training_client({model_id!r}).get_tokenizer()\n"
        "print(len(tok.encode('hello')) > 0, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr
