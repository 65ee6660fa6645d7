"""The blocking API and loop binding: plain scripts, threads, a running (notebook-like) loop, the client's own
loop, and futures awaited across loops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading

import pytest
from client_fixtures import LOOPS, HasURL, client, foreign_loop, run, small_batch

from hpcai_async import APIFuture, NotFoundError, ServiceClient, TrainingClient, types
from hpcai_async._loop import run_blocking

NULL_MODEL = "null/instant"
BUILTIN = "hpcai-async/tiny-qwen3"


def test_from_a_plain_script(null_server: HasURL) -> None:
    with client(null_server) as service:
        caps = service.get_server_capabilities()
        assert any(m.model_name == NULL_MODEL for m in caps.supported_models)
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)
        fb = tc.forward_backward(small_batch(2), "cross_entropy")
        assert isinstance(fb, APIFuture)
        opt = tc.optim_step(types.AdamParams())
        assert fb.result().metrics["step:max"] == 0
        assert (opt.result().metrics or {})["step:max"] == 1
        assert tc.get_info().model_id == tc.model_id
        runs = service.create_rest_client().list_training_runs(limit=100).result()
        assert tc.model_id in [r.training_run_id for r in runs.training_runs]


def test_from_many_threads_at_once(null_server: HasURL) -> None:
    with client(null_server) as service:
        tcs = [service.create_lora_training_client(NULL_MODEL, rank=4) for _ in range(4)]

        def train(tc: object) -> list[float]:
            assert hasattr(tc, "optim_step")
            futures = [tc.optim_step(types.AdamParams()) for _ in range(10)]  # type: ignore[attr-defined]
            return [f.result().metrics["step:max"] for f in futures]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(train, tcs))
    assert results == [[float(i) for i in range(1, 11)]] * 4


@pytest.mark.parametrize("loop", LOOPS)
def test_sync_api_inside_a_running_loop_uses_the_private_loop(null_server: HasURL, loop: str) -> None:
    """A notebook: an event loop is running, and plain calls still work (the client lives on another loop)."""

    async def notebook_cell() -> None:
        service = client(null_server)
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)  # blocking, on the private loop
        fut = tc.forward_backward(small_batch(1))
        assert fut.result().metrics["step:max"] == 0
        # the coroutine API from this (foreign) loop runs on the client's loop; its futures await from here
        opt = await tc.optim_step_async(types.AdamParams())
        assert (await opt).metrics["step:max"] == 1  # type: ignore[index]
        assert (await tc.get_info_async()).model_id == tc.model_id
        assert (await tc.forward_backward(small_batch(1))).metrics["step:max"] == 1
        await service.aclose()

    run(notebook_cell, loop)


def test_blocking_on_the_clients_own_loop_raises_at_once(null_server: HasURL) -> None:
    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            with pytest.raises(RuntimeError, match=r"await TrainingClient\.get_info_async"):
                tc.get_info()
            with pytest.raises(RuntimeError, match="forward_backward_async"):
                tc.forward_backward(small_batch(1))
            with pytest.raises(RuntimeError, match="aclose"):
                service.close()
            fut = await tc.optim_step_async(types.AdamParams())
            with pytest.raises(RuntimeError, match="await future"):
                fut.result()
            assert (await fut).metrics["step:max"] == 1  # type: ignore[index]
            assert fut.result().metrics["step:max"] == 1  # type: ignore[index]  # done: no wait, no error
            attached = service.create_training_client(tc.model_id)  # no base model known: needs the server
            with pytest.raises(RuntimeError, match="get_tokenizer_async"):
                attached.get_tokenizer()

    run(main)


class _Run:
    """The cookbook's pattern: a context manager whose ``__exit__`` unloads the model (plain call)."""

    def __init__(self, tc: TrainingClient) -> None:
        self.tc = tc
        self.unloaded: APIFuture[types.UnloadModelResponse] | None = None

    def __enter__(self) -> TrainingClient:
        return self.tc

    def __exit__(self, *exc: object) -> None:
        self.unloaded = self.tc.unload_model()


@pytest.mark.parametrize("loop", LOOPS)
def test_plain_calls_that_can_complete_work_inside_async_code_on_the_clients_loop(
    server: HasURL, loop: str
) -> None:
    """get_tokenizer() and unload_model() from ``async def`` code, on the loop the client is bound to."""

    async def main() -> None:
        async with client(server) as service:
            tc = await service.create_lora_training_client_async(BUILTIN, rank=4)
            tokenizer = tc.get_tokenizer()  # loaded here, without the loop
            assert tokenizer.decode(tokenizer.encode(" green")) == " green"
            assert tc.get_tokenizer() is tokenizer is await tc.get_tokenizer_async()  # loaded once
            sampler = await tc.save_weights_and_get_sampling_client_async("s")
            sample = sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2))
            rest = service.create_rest_client().list_checkpoints(tc.model_id)  # futures: scheduled here
            ctx = _Run(tc)
            with ctx as training:
                fb = await training.forward_backward_async(small_batch(1))
            assert isinstance(ctx.unloaded, APIFuture)
            assert (await ctx.unloaded).model_id == tc.model_id
            assert (await fb).metrics  # called before the unload: it ran first
            assert len((await sample).sequences) == 1 and (await rest).checkpoints
            assert server.scheduler.models[tc.model_id].status == "unloaded"  # type: ignore[attr-defined]
            with pytest.raises(NotFoundError, match="unloaded"):
                await (await tc.forward_backward_async(small_batch(1)))

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_unload_model_result_completes_inside_async_code_on_the_clients_loop(
    null_server: HasURL, loop: str
) -> None:
    """The cookbook's ``unload_model().result()`` in ``__exit__``, with the client's earlier work all done."""

    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            await (await tc.forward_backward_async(small_batch(1)))
            await (await tc.optim_step_async(types.AdamParams()))
            assert tc.unload_model().result(timeout=30).model_id == tc.model_id  # blocking, on the loop
            run_ = null_server.scheduler.models[tc.model_id]  # type: ignore[attr-defined]
            assert run_.status == "unloaded"
            with pytest.raises(NotFoundError, match="unloaded"):
                await (await tc.forward_backward_async(small_batch(1)))

    run(main, loop)


def test_futures_cross_loops_and_threads(null_server: HasURL) -> None:
    """A future made on one loop is awaited on a loop in another thread, and read from a third thread."""

    async def main() -> None:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            fut = await tc.optim_step_async(types.AdamParams())

            async def on_other_loop() -> float:
                return (await fut).metrics["step:max"]  # type: ignore[index]

            other = foreign_loop()
            try:
                from_other_loop = await asyncio.to_thread(other.run, on_other_loop(), 10)
            finally:
                await asyncio.to_thread(other.stop)
            from_thread = await asyncio.to_thread(lambda: fut.result(timeout=10).metrics["step:max"])  # type: ignore[index]
            assert from_other_loop == from_thread == 1

    run(main)


def test_a_client_is_reusable_across_asyncio_run_calls(null_server: HasURL) -> None:
    service = client(null_server)

    async def first() -> str:
        tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
        return tc.model_id

    async def second() -> int:
        return len((await service.get_server_capabilities_async()).supported_models)

    try:
        assert asyncio.run(first())
        assert asyncio.run(second()) >= 1  # the first loop is closed: the client binds to the new one
    finally:
        asyncio.run(service.aclose())


def test_close_and_context_managers(null_server: HasURL) -> None:
    service = client(null_server)
    service.close()  # never used: nothing to close, no loop started
    with client(null_server) as service:
        service.get_server_capabilities()
    with pytest.raises(Exception, match="closed"):
        service.get_server_capabilities()

    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            with ServiceClient(base_url=null_server.url, api_key=null_server.api_key) as s:
                s.get_server_capabilities()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(30)
    assert not errors


def test_a_blocking_call_hands_back_its_value_its_error_or_its_cancellation() -> None:
    """``run_blocking``, the hop behind every blocking method, against a loop in another thread."""
    with foreign_loop() as loop:

        async def value() -> int:
            return 7

        async def fails() -> None:
            raise NotFoundError("no such run", status=404)

        async def cancelled() -> None:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(1)

        assert run_blocking(loop, value()) == 7
        with pytest.raises(NotFoundError, match="no such run"):
            run_blocking(loop, fails())
        with pytest.raises(concurrent.futures.CancelledError):
            run_blocking(loop, cancelled())


def test_an_interrupted_blocking_call_cancels_its_work_on_the_loop() -> None:
    """Ctrl-C while a blocking method waits: the call raises KeyboardInterrupt and its task is cancelled."""
    stopped = threading.Event()
    with foreign_loop() as loop:

        async def long_call() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                stopped.set()
                raise

        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            run_blocking(loop, long_call())
        assert stopped.wait(5)
