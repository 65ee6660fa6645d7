"""Concurrency controllers against a real local server: the samples in flight are counted server-side.

The fixed controller never lets more than its limit onto the server; the adaptive one halves on 429s (from
the fault proxy, once per window) and on samples that wait in the server's queue (a slow engine that runs one
sample at a time), grows while the queue is empty, and without the queue signal (the hosted dialect) reacts
to 429s only.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Callable
from typing import Any

import pytest
from client_fixtures import InFlight, SlowSampler, client, run
from fault_proxy import FaultProxy

from hpcai_async import (
    AdaptiveConcurrencyController,
    ConfigurationError,
    FixedConcurrencyController,
    RetryConfig,
    SamplingClient,
    types,
)
from hpcai_async.server import NULL_MODEL, LocalServer

Factory = Callable[..., LocalServer]
PROMPT = types.ModelInput.from_ints([1, 2, 3])
PARAMS = types.SamplingParams(max_tokens=2)
FAST = {"retry-after-ms": "20"}
# our server's features without "batch" and "inline_result": each sample is its own POST asample (the proxy
# can fault it) and its result comes from retrieve_future
NO_BATCH = (
    b'{"supported_models": [{"model_name": "null/instant"}], '
    b'"features": ["seq_id", "msgpack", "long_poll", "queue_duration"]}'
)


async def _sample_all(sampler: SamplingClient, count: int) -> list[types.SampleResponse]:
    return await asyncio.gather(*(sampler.sample_async(PROMPT, 1, PARAMS) for _ in range(count)))


def test_the_fixed_controller_never_has_more_than_its_limit_on_the_server(server_factory: Factory) -> None:
    server = server_factory(engine=SlowSampler(0.03))
    counted = InFlight(server)

    async def main() -> None:
        async with client(server) as service:
            limited = service.create_sampling_client(
                base_model=NULL_MODEL, concurrency_controller=FixedConcurrencyController(3)
            )
            assert len(await _sample_all(limited, 12)) == 12
            assert limited.concurrency_controller is not None
            assert limited.concurrency_controller.in_flight == 0
            assert (counted.peak, counted.submitted) == (3, 12)  # the limit was reached, never passed
            counted.peak = 0
            unlimited = service.create_sampling_client(base_model=NULL_MODEL)
            await _sample_all(unlimited, 12)
            assert counted.peak > 3  # the count does see more when nothing limits it

    run(main)


def test_retry_config_max_connections_is_a_fixed_controller(server_factory: Factory) -> None:
    server = server_factory(engine=SlowSampler(0.02))
    counted = InFlight(server)

    async def main() -> None:
        async with client(server) as service:
            sampler = service.create_sampling_client(
                base_model=NULL_MODEL, retry_config=RetryConfig(max_connections=2)
            )
            controller = sampler.concurrency_controller
            assert isinstance(controller, FixedConcurrencyController) and controller.window == 2
            await _sample_all(sampler, 8)
            assert counted.peak == 2
            given = AdaptiveConcurrencyController(4)
            both = service.create_sampling_client(
                base_model=NULL_MODEL,
                retry_config=RetryConfig(max_connections=2),
                concurrency_controller=given,
            )
            assert both.concurrency_controller is given  # one mechanism: the controller given wins

    run(main)


def test_one_controller_bounds_clients_on_different_loops_and_threads(server_factory: Factory) -> None:
    """A sync client (the private loop's thread) and an async one (the test's loop) share one budget."""
    server = server_factory(engine=SlowSampler(0.02))
    counted = InFlight(server)
    shared = FixedConcurrencyController(2)
    sync_service = client(server)
    sync_sampler = sync_service.create_sampling_client(base_model=NULL_MODEL, concurrency_controller=shared)
    futures: list[Any] = []
    thread = threading.Thread(
        target=lambda: futures.extend(sync_sampler.sample(PROMPT, 1, PARAMS) for _ in range(6))
    )

    async def main() -> None:
        async with client(server) as service:
            sampler = service.create_sampling_client(base_model=NULL_MODEL, concurrency_controller=shared)
            thread.start()
            await _sample_all(sampler, 6)

    try:
        run(main)
        thread.join()
        assert all(len(f.result(timeout=30).sequences) == 1 for f in futures)
    finally:
        sync_service.close()
    assert counted.submitted == 12 and counted.peak == 2 and shared.in_flight == 0


@pytest.mark.parametrize("dialect", ["local", "hosted"])
def test_the_adaptive_window_halves_on_429_once_per_window(server_factory: Factory, dialect: str) -> None:
    """Four samples sent under window 8 all get a 429: one cut (8 -> 4), not four. A 429 of a sample sent
    under the new window cuts again (4 -> 2). The hosted dialect (no queue signal) reacts the same."""
    server = server_factory(dialect=dialect)
    with FaultProxy(server.url) as proxy:
        if dialect == "local":
            proxy.inject("get_server_capabilities", "status", status=200, body=NO_BATCH)

        async def main() -> None:
            async with client(server, base_url=proxy.url) as service:
                controller = AdaptiveConcurrencyController(initial_window=8)
                sampler = service.create_sampling_client(
                    base_model=NULL_MODEL, concurrency_controller=controller
                )
                await sampler.sample_async(
                    PROMPT, 1, PARAMS
                )  # capabilities fetched: no batching from here on
                proxy.inject("asample", "status", status=429, headers=FAST, times=4)
                await _sample_all(sampler, 4)
                assert controller.window == 4
                proxy.inject("asample", "status", status=429, headers=FAST)
                await sampler.sample_async(PROMPT, 1, PARAMS)
                assert controller.window == 2

        run(main)
    assert len(proxy.find("asample")) == 1 + 4 * 2 + 2  # each 429'd sample went again


def _queued_sampling(
    server_factory: Factory, dialect: str
) -> tuple[AdaptiveConcurrencyController, SlowSampler]:
    """24 samples with window 8 on a server whose engine runs one sample at a time for 40 ms: the eighth
    sample of a round waits ~280 ms in the queue."""
    engine = SlowSampler(0.04)
    server = server_factory(engine=engine, dialect=dialect)
    server.scheduler.max_batch_sequences = 1  # one sample per engine call: the others queue
    controller = AdaptiveConcurrencyController(initial_window=8, target_queue_latency=0.05)

    async def main() -> None:
        async with client(server) as service:
            sampler = service.create_sampling_client(base_model=NULL_MODEL, concurrency_controller=controller)
            await _sample_all(sampler, 24)

    run(main)
    return controller, engine


def test_the_adaptive_window_shrinks_when_samples_wait_in_the_servers_queue(server_factory: Factory) -> None:
    controller, engine = _queued_sampling(server_factory, "local")
    assert set(engine.batches) == {1}
    assert controller.window < 8  # the first round's mean wait (~140 ms) is over the 50 ms target


def test_without_the_queue_signal_the_adaptive_window_does_not_shrink(server_factory: Factory) -> None:
    controller, _ = _queued_sampling(server_factory, "hosted")  # the hosted dialect sends no queue duration
    assert controller.window > 8  # only rounds without a 429: it grew


def test_the_adaptive_window_grows_while_the_queue_is_empty(null_server: Any) -> None:
    """30 samples at once from window 2: rounds of 2, 3, 4, 5, 6 and 7 results each grow it by one."""
    controller = AdaptiveConcurrencyController(initial_window=2, target_queue_latency=5.0)

    async def main() -> None:
        async with client(null_server) as service:
            sampler = service.create_sampling_client(base_model=NULL_MODEL, concurrency_controller=controller)
            await _sample_all(sampler, 30)
            lone = AdaptiveConcurrencyController(initial_window=2)
            one_at_a_time = service.create_sampling_client(base_model=NULL_MODEL, concurrency_controller=lone)
            for _ in range(10):
                await one_at_a_time.sample_async(PROMPT, 1, PARAMS)
            assert lone.window == 2  # never the limit: a client that sends little does not inflate it

    run(main)
    assert controller.window == 8 and controller.in_flight == 0


def test_controllers_check_their_settings_and_pickle_as_fresh_ones() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="max_concurrency"):
            FixedConcurrencyController(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="min_window <= initial_window <= max_window"):
        AdaptiveConcurrencyController(initial_window=300)
    with pytest.raises(ConfigurationError, match="decrease_factor"):
        AdaptiveConcurrencyController(decrease_factor=1.0)
    with pytest.raises(ConfigurationError, match="target_queue_latency"):
        AdaptiveConcurrencyController(target_queue_latency=float("nan"))
    adaptive = AdaptiveConcurrencyController(4, 2, 64, target_queue_latency=0.1, increase_step=2)
    copy = pickle.loads(pickle.dumps(adaptive))
    assert type(copy) is AdaptiveConcurrencyController and copy is not adaptive
    assert copy.settings() == adaptive.settings() and copy.window == 4 and copy.in_flight == 0
    fixed = pickle.loads(pickle.dumps(FixedConcurrencyController(5)))
    assert fixed.window == 5 and fixed.settings() == {"max_concurrency": 5}
