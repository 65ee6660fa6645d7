"""Unhappy paths through the fault proxy: retries with the same key, Retry-After, the retry budget, polling
failures, backpressure, timeouts and cancellation. Everything runs against the real local (null) server.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from client_fixtures import HasURL, client, run, small_batch, without_inline_results
from fault_proxy import FaultProxy

from hpcai_async import (
    APITimeoutError,
    BadRequestError,
    GoneError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RequestFailedError,
    RetryBudgetExceededError,
    ServiceClient,
    types,
)
from hpcai_async._poll import POLL_AT_ONCE, POLL_PAUSE_FRACTION, Poller

NULL_MODEL = "null/instant"
FAST = {"retry-after-ms": "20"}  # keeps the injected retries quick


def _keys(proxy: FaultProxy, endpoint: str) -> list[str]:
    return [r.headers["x-idempotency-key"] for r in proxy.find(endpoint)]


@pytest.mark.parametrize("kind", ["status", "reset"])
def test_retry_after_the_server_ran_it_reuses_the_key_and_runs_once(null_server: HasURL, kind: str) -> None:
    """The server runs optim_step but the answer is lost (503 or a reset): the retry must not step twice."""
    with FaultProxy(null_server.url) as proxy:

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                proxy.inject("optim_step", kind, after=True, headers=FAST)
                first = await (await tc.optim_step_async(types.AdamParams()))
                second = await (await tc.optim_step_async(types.AdamParams()))
                assert (first.metrics or {})["step:max"] == 1
                assert (second.metrics or {})["step:max"] == 2  # not 3: the retried one ran once

        run(main)
    keys = _keys(proxy, "optim_step")
    assert len(keys) == 3 and keys[0] == keys[1] != keys[2]


def test_5xx_408_409_429_and_truncated_answers_are_retried(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                proxy.inject("forward_backward", "truncate")  # first: its backoff is the shortest
                for status in (500, 502, 503, 408, 409, 429):
                    proxy.inject("forward_backward", "status", status=status, headers=FAST)
                result = await (await tc.forward_backward_async(small_batch(2)))
                assert result.metrics["num_examples:sum"] == 2

        run(main)
    keys = _keys(proxy, "forward_backward")
    assert len(keys) == 8 and len(set(keys)) == 1


def test_retry_after_is_honoured(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        proxy.inject("get_server_capabilities", "status", status=503, headers={"retry-after-ms": "300"})
        proxy.inject("get_server_capabilities", "status", status=429, headers={"Retry-After": "1"})
        with client(null_server, base_url=proxy.url) as service:
            service.get_server_capabilities()
    times = [r.at for r in proxy.find("get_server_capabilities")]
    assert len(times) == 3
    assert 0.3 <= times[1] - times[0] < 1.5  # retry-after-ms: 300
    assert 1.0 <= times[2] - times[1] < 2.5  # Retry-After: 1


def test_no_retry_on_4xx_or_when_the_server_says_so(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        proxy.inject(
            "get_server_capabilities", "status", status=400, body=b'{"error": "X", "message": "nope"}'
        )
        proxy.inject("get_server_capabilities", "status", status=503, headers={"x-should-retry": "false"})
        with client(null_server, base_url=proxy.url) as service:
            with pytest.raises(BadRequestError, match="nope") as bad:
                service.get_server_capabilities()
            assert bad.value.status == 400 and bad.value.code == "X"
            with pytest.raises(InternalServerError):
                service.get_server_capabilities()
    assert len(proxy.find("get_server_capabilities")) == 2


def test_retry_budget_exhausted(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        proxy.inject(
            "get_server_capabilities", "status", status=503, times=10_000, headers={"retry-after-ms": "50"}
        )
        with client(null_server, base_url=proxy.url, retry_timeout=0.6) as service:
            start = time.monotonic()
            with pytest.raises(RetryBudgetExceededError) as info:
                service.get_server_capabilities()
            elapsed = time.monotonic() - start
    assert 0.6 <= elapsed < 3.0
    message = str(info.value)
    assert "HTTP 503" in message and "retry budget 0.6 s" in message and "get_server_capabilities" in message


def test_unreachable_server_exhausts_the_budget_with_a_connection_error(null_server: HasURL) -> None:
    with (
        FaultProxy(null_server.url) as proxy,
        client(null_server, base_url=proxy.url, retry_timeout=0.5) as service,
    ):
        proxy.inject("get_server_capabilities", "reset", times=10_000)
        with pytest.raises(RetryBudgetExceededError, match=r"Disconnect|[Cc]onnection"):
            service.get_server_capabilities()


# ----------------------------------------------------------------------------------------- polling


def test_polling_survives_5xx_resets_and_408(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        without_inline_results(proxy)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                proxy.inject("retrieve_future", "status", status=503, headers=FAST)
                proxy.inject("retrieve_future", "reset")
                proxy.inject("retrieve_future", "status", status=408, body=b'{"queue_state": "in_queue"}')
                proxy.inject("retrieve_future", "status", status=429, headers=FAST)
                result = await (await tc.optim_step_async(types.AdamParams()))
                assert (result.metrics or {})["step:max"] == 1

        run(main)
    iterations = [r.headers["x-hpcai-request-iteration"] for r in proxy.find("retrieve_future")]
    assert iterations[-5:] == ["0", "1", "2", "3", "4"]  # the optim_step's polls, counted


def test_a_failed_job_raises_request_failed_error(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        without_inline_results(proxy)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                body = b'{"error": "EngineError", "message": "the device fell over"}'
                proxy.inject("retrieve_future", "status", status=200, body=body)
                fut = await tc.forward_async(small_batch(1))
                with pytest.raises(RequestFailedError, match="the device fell over") as info:
                    await fut
                assert info.value.request_id and info.value.code == "EngineError"
                assert info.value.request_id in str(info.value)

        run(main)


def test_an_expired_future_is_gone(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        without_inline_results(proxy)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                proxy.inject(
                    "retrieve_future", "status", status=410, body=b'{"error": "GoneError", "message": "gone"}'
                )
                with pytest.raises(GoneError):
                    await (await tc.forward_async(small_batch(1)))
                # a sample whose future is gone is sampled again
                proxy.inject("retrieve_future", "status", status=410, body=b'{"message": "gone"}')
                sampler = service.create_sampling_client(base_model=NULL_MODEL)
                response = await sampler.sample_async(
                    types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=1)
                )
                assert len(response.sequences) == 1

        run(main)
    assert len(proxy.find("asample")) == 2


def test_quick_try_again_is_polled_with_short_growing_pauses(null_server: HasURL) -> None:
    """The proxy answers try_again at once 20 times: the client pauses ~10 % of the time waited, not 0.5 s."""
    with FaultProxy(null_server.url) as proxy:
        without_inline_results(proxy)

        async def main() -> float:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                body = b'{"type": "try_again", "request_id": "x"}'
                proxy.inject("retrieve_future", "status", status=200, body=body, times=20)
                start = time.monotonic()
                await (await tc.optim_step_async(types.AdamParams()))
                return time.monotonic() - start

        elapsed = run(main)
    polls = proxy.find("retrieve_future")[-21:]
    gaps = [b.at - a.at for a, b in itertools.pairwise(polls)]
    assert min(gaps) < 0.05  # the first pauses are short ...
    assert all(g < 0.5 for g in gaps)  # ... and never the official client's fixed half second
    for at, gap in zip([p.at - polls[0].at for p in polls[:-1]], gaps, strict=True):
        assert gap <= 0.3 * at + 0.15  # proportional to the time waited so far (slack: shared CI cores)
    assert elapsed < 3.0  # a fixed half second would take 10 s


def test_a_quick_try_again_is_polled_again_at_once_for_the_first_milliseconds() -> None:
    """As tinker's client: no pause while the future has waited less than POLL_AT_ONCE; then ~10 %."""

    async def main() -> tuple[float, float]:
        poller = Poller(())
        t0 = time.monotonic()
        for _ in range(20):  # each would sleep at least POLL_PAUSE_MIN (1 ms) if it paused
            await poller._pause(t0, time.monotonic())
        at_once = time.monotonic() - t0
        t1 = time.monotonic()
        await poller._pause(t1 - 1.0, t1)  # waited 1 s: pause ~0.1 s
        return at_once, time.monotonic() - t1

    at_once, later = run(main)
    assert POLL_AT_ONCE <= 0.01 and at_once < 0.015
    assert 0.8 * POLL_PAUSE_FRACTION <= later < 0.5


# ----------------------------------------------------------------------------------------- sampling


def test_sampling_429_is_a_shared_backpressure_window(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                await service.get_server_capabilities_async()
                a = service.create_sampling_client(base_model=NULL_MODEL)
                b = service.create_sampling_client(base_model=NULL_MODEL)
                prompt, params = types.ModelInput.from_ints([1, 2]), types.SamplingParams(max_tokens=1)
                proxy.inject("asample", "status", status=429, headers={"retry-after-ms": "400"})
                first = asyncio.ensure_future(a.sample_async(prompt, 1, params))
                await asyncio.sleep(0.1)  # the 429 has opened the window by now
                second = await b.sample_async(prompt, 1, params)
                assert len((await first).sequences) == len(second.sequences) == 1

        run(main)
    posts = proxy.find("asample")
    assert len(posts) == 3
    rejected_at = posts[0].at
    assert all(p.at - rejected_at >= 0.39 for p in posts[1:])  # b waited for a's window too
    # a's retry (its key again) and b's request both go once the window closes, in either order
    keys = [p.headers["x-idempotency-key"] for p in posts]
    assert keys.count(keys[0]) == 2 and len(set(keys)) == 2


# ----------------------------------------------------------------------------------------- timeouts


def test_result_timeout_raises_timeout_error_and_the_work_goes_on(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy, client(null_server, base_url=proxy.url) as service:
        without_inline_results(proxy)
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)
        proxy.inject("retrieve_future", "delay", delay=0.4, times=5)
        fut = tc.optim_step(types.AdamParams())
        with pytest.raises(TimeoutError) as info:
            fut.result(timeout=0.05)
        assert isinstance(info.value, APITimeoutError)
        assert not fut.done()
        assert (fut.result(timeout=10).metrics or {})["step:max"] == 1

        async def wait_briefly() -> None:
            fut2 = tc.forward(small_batch(1))
            proxy.inject("retrieve_future", "delay", delay=0.4, times=5)
            with pytest.raises(APITimeoutError):
                await fut2.result_async(timeout=0.05)
            assert (await fut2).metrics["step:max"] == 1

        run(wait_briefly)


def test_cancel_stops_polling(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        without_inline_results(proxy)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                body = b'{"type": "try_again", "request_id": "x"}'
                proxy.inject("retrieve_future", "status", status=200, body=body, times=10_000)
                fut = await tc.forward_async(small_batch(1))
                await asyncio.sleep(0.1)
                assert fut.cancel()
                await asyncio.sleep(0.05)
                polls = len(proxy.find("retrieve_future"))
                await asyncio.sleep(0.3)
                assert len(proxy.find("retrieve_future")) == polls  # no more polling
                assert fut.cancelled() and fut.done()
                with pytest.raises(asyncio.CancelledError):
                    await fut

        run(main)


def test_sync_future_cancel(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy, client(null_server, base_url=proxy.url) as service:
        without_inline_results(proxy)
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)
        proxy.inject("retrieve_future", "status", status=200, body=b'{"type": "try_again"}', times=10_000)
        fut = tc.forward(small_batch(1))
        time.sleep(0.1)
        assert fut.cancel()
        time.sleep(0.05)
        polls = len(proxy.find("retrieve_future"))
        time.sleep(0.3)
        assert len(proxy.find("retrieve_future")) == polls
        assert fut.cancelled()


def test_instant_results_come_inline_without_a_retrieve_future(null_server: HasURL) -> None:
    """Where the server offers "inline_result", a job done within the wait needs one request, not two.

    The client asks for a 10 ms wait: on a loaded machine an instant job can miss it (and is then polled, as
    it must be), so the round is tried up to three times and one of them must need no poll at all."""
    for _ in range(3):
        retrieves = _inline_round(null_server)
        if not retrieves:
            return
    assert retrieves == []


def _inline_round(null_server: HasURL) -> list[Any]:
    with FaultProxy(null_server.url) as proxy:

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
                fb = await tc.forward_backward_async(small_batch(2))
                opt = await tc.optim_step_async(types.AdamParams())
                assert len((await fb).loss_fn_outputs) == 2
                assert ((await opt).metrics or {})["step:max"] == 1
                sampler = service.create_sampling_client(base_model=NULL_MODEL)
                sample = await sampler.sample_async(
                    types.ModelInput.from_ints([1]), 3, types.SamplingParams(max_tokens=2)
                )
                assert len(sample.sequences) == 3

        run(main)
    submits = proxy.find("forward_backward") + proxy.find("optim_step") + proxy.find("asample")
    assert len(submits) == 3
    assert all(r.headers["x-hpcai-async-inline-wait"] for r in submits)
    return list(proxy.find("retrieve_future"))


def test_a_sampler_throttled_forever_fails_when_its_budget_is_spent(null_server: HasURL) -> None:
    """Before: every 429 on a sample restarted its retry clock, so it retried forever."""
    with FaultProxy(null_server.url) as proxy:

        async def main() -> None:
            async with client(null_server, base_url=proxy.url, retry_timeout=0.6) as service:
                sampler = service.create_sampling_client(base_model=NULL_MODEL)
                await service.get_server_capabilities_async()
                proxy.inject("asample", "status", status=429, headers=FAST, times=10_000)
                started = time.monotonic()
                with pytest.raises(RetryBudgetExceededError) as info:
                    await sampler.sample_async(types.ModelInput.from_ints([1]), 1, types.SamplingParams())
                assert time.monotonic() - started < 3
                text = str(info.value)
                assert "asample" in text and "last status 429" in text and " s without progress" in text
                assert info.value.status == 429

        run(main, timeout=20)


def test_a_sample_whose_future_the_server_forgot_is_sampled_again(null_server: HasURL) -> None:
    """After a server restart the future's id is unknown (404): sampling has no side effects, so re-submit."""
    with FaultProxy(null_server.url) as proxy:
        without_inline_results(proxy)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                sampler = service.create_sampling_client(base_model=NULL_MODEL)
                body = (
                    b'{"error": "NotFoundError", "message": "no future with this id (the server restarted?)"}'
                )
                proxy.inject("retrieve_future", "status", status=404, body=body, times=2)
                out = await sampler.sample_async(
                    types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams()
                )
                assert len(out.sequences) == 1

        run(main)
    assert len(proxy.find("asample")) == 3  # the first two futures were lost; each time sampled again


def test_a_training_future_the_server_forgot_is_not_resubmitted(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        without_inline_results(proxy)

        async def main() -> None:
            async with client(null_server, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL)
                proxy.inject("retrieve_future", "status", status=404, times=1)
                with pytest.raises(NotFoundError):
                    await (await tc.optim_step_async(types.AdamParams(learning_rate=1e-3)))

        run(main)
    assert len(proxy.find("optim_step")) == 1  # never applied twice


def test_read_timeouts_are_configurable_and_the_final_error_says_what_happened(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:

        async def main() -> None:
            options = {"base_url": proxy.url, "timeout": 0.3, "retry_timeout": 0.8}
            async with client(null_server, **options) as service:
                await service.get_server_capabilities_async()
                proxy.inject("create_model", "stall", delay=5.0, times=10)
                started = time.monotonic()
                with pytest.raises(RetryBudgetExceededError) as info:
                    await service.create_lora_training_client_async(NULL_MODEL)
                took = time.monotonic() - started
                assert 0.8 <= took < 3.0  # a few 0.3 s reads, not the 60 s default
                assert "POST create_model" in str(info.value) and "Timeout" in str(info.value)

        run(main, timeout=20)


def test_the_poll_timeout_is_configurable(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        without_inline_results(proxy)

        async def main() -> None:
            options = {"base_url": proxy.url, "poll_timeout": 0.3, "retry_timeout": 0.8}
            async with client(null_server, **options) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL)
                proxy.inject("retrieve_future", "stall", delay=5.0, times=100)
                fut = await tc.optim_step_async(types.AdamParams(learning_rate=1e-3))
                started = time.monotonic()
                with pytest.raises(RetryBudgetExceededError, match="retrieve_future"):
                    await fut
                assert time.monotonic() - started < 3.0

        run(main, timeout=20)


# ----------------------------------------------------------------------------------------- redirects


async def _redirector(target: str) -> tuple[Any, str, list[dict[str, str]]]:
    """A loopback server answering every request with a 307 to ``target`` (+ the path); what it received."""
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        if target == "self" and request.path.startswith("/moved"):
            return web.json_response({"supported_models": [{"model_name": NULL_MODEL}], "features": []})
        where = f"/moved{request.path_qs}" if target == "self" else f"{target}{request.path_qs}"
        raise web.HTTPTemporaryRedirect(where)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", seen


def test_credentials_never_follow_a_redirect_to_another_origin() -> None:
    async def main() -> None:
        other, other_url, other_seen = await _redirector("self")  # another port: another origin
        front, front_url, front_seen = await _redirector(other_url)
        try:
            async with ServiceClient(base_url=front_url, api_key="secret-key") as service:
                with pytest.raises(PermissionDeniedError, match="another origin") as info:
                    await service.get_server_capabilities_async()
                assert "not followed" in str(info.value)
            assert other_seen == []  # nothing, so no key, reached the other origin
            assert front_seen[0].get("X-API-Key") == "secret-key"
        finally:
            await front.cleanup()
            await other.cleanup()

    run(main)


def test_a_redirect_within_the_origin_is_followed_with_the_key() -> None:
    async def main() -> None:
        runner, url, seen = await _redirector("self")
        try:
            async with ServiceClient(base_url=url, api_key="secret-key") as service:
                caps = await service.get_server_capabilities_async()
                assert [m.model_name for m in caps.supported_models] == [NULL_MODEL]
            assert [h.get("X-API-Key") for h in seen] == ["secret-key", "secret-key"]
        finally:
            await runner.cleanup()

    run(main)
