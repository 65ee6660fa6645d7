"""The fault suite: through the loopback fault proxy, nothing is applied twice, skipped, or corrupted.

* N training steps on the real engine (built-in model) with every kind of fault injected -- resets before,
  in the middle of and after a request, truncated and stalled answers, 5xx bursts, 429 with and without
  Retry-After, 408 -- apply exactly N optimizer steps, and the saved weights equal a fault-free run's bit for
  bit;
* samples in flight across a server restart are sampled again and all complete; a training request across
  it fails with the typed "resume from a checkpoint" error;
* a scaled-down load test: 1,000 concurrent samples on the null engine, with throttling and resets on the way
  (the full 10,000 is in ``bench/``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client_fixtures import HasURL, client, datum, run, without_inline_results
from fault_proxy import FaultProxy

from hpcai_async import NotFoundError, ServiceClient, types

BUILTIN = "hpcai-async/tiny-qwen3"
NULL_MODEL = "null/instant"
STEPS = 4
ADAM = types.AdamParams(learning_rate=5e-3)
FAST = {"retry-after-ms": "30"}


def _batch(step: int) -> list[types.Datum]:
    rng = np.random.default_rng(step)
    return [datum(rng.integers(1, 200, size=9)) for _ in range(2)]


async def _train(service: ServiceClient, faults: Callable[[int], None] | None = None) -> tuple[Any, ...]:
    """STEPS pipelined steps; the optim_step step counters, the run id and its saved checkpoint's id."""
    tc = await service.create_lora_training_client_async(BUILTIN, rank=4, seed=7)
    steps: list[float] = []
    for step in range(STEPS + 1):
        if faults is not None:
            faults(step)
        if step == STEPS:
            break
        fb = await tc.forward_backward_async(_batch(step), "cross_entropy")
        opt = await tc.optim_step_async(ADAM)
        await fb
        steps.append((await opt).metrics["step:max"])
    saved = await (await tc.save_state_async("final"))
    return steps, tc.model_id, saved.path.rsplit("/", 1)[-1]


def _weights(server: Any, run_id: str, checkpoint_id: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    ref = server.store.get_checkpoint(run_id, checkpoint_id)
    files = sorted(Path(ref.directory).glob("*.safetensors"))
    assert files, f"no tensors saved in {ref.directory}"
    out: dict[str, np.ndarray] = {}
    for file in files:
        out.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return out


# The faults of each step: a few per step, so that no one request's backoff grows long.
FAULTS: dict[int, list[tuple[str, str, dict[str, Any]]]] = {
    0: [
        ("forward_backward", "reset", {}),  # before the server saw it
        ("forward_backward", "status", {"status": 503, "after": True, "headers": FAST}),  # ran; answer lost
        ("optim_step", "status", {"status": 429}),  # without Retry-After: backoff
        ("retrieve_future", "status", {"status": 503, "times": 2, "headers": FAST}),  # a 5xx burst
    ],
    1: [
        ("forward_backward", "cut", {}),  # a reset in the middle of the request
        ("optim_step", "stall", {"delay": 3.0}),  # half an answer, then nothing: the read timeout ends it
        ("retrieve_future", "reset", {"after": True}),
    ],
    2: [
        ("forward_backward", "reset", {"after": True}),  # ran; the connection dropped before the answer
        ("optim_step", "status", {"status": 502, "times": 3, "headers": FAST}),  # a 5xx burst
        ("retrieve_future", "truncate", {}),  # half an answer
    ],
    3: [
        ("forward_backward", "truncate", {}),
        ("optim_step", "status", {"status": 429, "headers": FAST}),  # with Retry-After
        ("retrieve_future", "stall", {"delay": 3.0}),
        ("retrieve_future", "status", {"status": 408}),  # "still queued"
    ],
    STEPS: [("save_weights", "status", {"status": 500, "after": True, "headers": FAST})],
}


def test_training_through_every_fault_applies_each_step_once_and_matches_a_clean_run(server: HasURL) -> None:
    with FaultProxy(server.url) as proxy:
        without_inline_results(proxy)  # every result goes through retrieve_future, so poll faults apply

        def inject(step: int) -> None:
            for path, kind, options in FAULTS.get(step, []):
                proxy.inject(path, kind, **options)  # type: ignore[arg-type]

        async def main() -> tuple[Any, Any]:
            async with client(server) as clean_service:
                clean = await _train(clean_service)
            # short read timeouts, so that stalled answers cost a second, not a minute
            async with client(server, base_url=proxy.url, timeout=1.0, poll_timeout=1.0) as faulty_service:
                faulty = await _train(faulty_service, inject)
            return clean, faulty

        (clean_steps, clean_run, clean_ckpt), (steps, run_id, ckpt) = run(main, timeout=240)
        fired = {(f.path, f.kind, f.status): f.fired for f in proxy.faults}
    assert all(fired.values()), f"faults that never fired: {[k for k, n in fired.items() if not n]}"
    assert steps == clean_steps == [float(i) for i in range(1, STEPS + 1)]  # exactly N steps, in order
    clean_weights, weights = _weights(server, clean_run, clean_ckpt), _weights(server, run_id, ckpt)
    assert clean_weights.keys() == weights.keys()
    for name, value in clean_weights.items():
        assert np.array_equal(value, weights[name]), name  # bit for bit


def test_samples_in_flight_across_a_server_restart_are_sampled_again(
    server_factory: Any, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    first = server_factory(store=store)
    port = int(first.url.rsplit(":", 1)[1].split("/", 1)[0])
    with FaultProxy(first.url) as proxy:
        without_inline_results(proxy)
        proxy.inject("retrieve_future", "delay", delay=0.3, times=10_000)  # polls are slow: futures wait

        async def main() -> None:
            async with client(first, base_url=proxy.url) as service:
                tc = await service.create_lora_training_client_async(NULL_MODEL)
                sampler = service.create_sampling_client(base_model=NULL_MODEL)
                prompt, params = types.ModelInput.from_ints([1, 2, 3]), types.SamplingParams(max_tokens=2)
                samples = [asyncio.ensure_future(sampler.sample_async(prompt, 1, params)) for _ in range(50)]
                training = await tc.optim_step_async(ADAM)
                while len(proxy.find("asample")) < 50 or not proxy.find("optim_step"):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(first.close)  # the server goes away with every future it knew
                await asyncio.to_thread(server_factory, store=store, port=port, api_key=first.api_key)
                done = await asyncio.gather(*samples)
                assert all(len(r.sequences) == 1 for r in done)
                with pytest.raises(NotFoundError):  # training state is gone: the typed "resume" error
                    await training

        run(main, timeout=60)
    assert len(proxy.find("asample")) >= 100  # each sample went again after the restart


def test_1000_concurrent_samples_through_throttling_and_resets(null_server: HasURL) -> None:
    with FaultProxy(null_server.url) as proxy:
        proxy.inject("asample", "status", status=429, times=20, headers=FAST)
        proxy.inject("asample", "reset", times=3)
        proxy.inject("batch", "reset", after=True, times=3)

        async def main() -> float:
            async with client(null_server, base_url=proxy.url) as service:
                sampler = service.create_sampling_client(base_model=NULL_MODEL)
                prompt, params = types.ModelInput.from_ints([1, 2, 3]), types.SamplingParams(max_tokens=4)
                started = time.monotonic()
                out = await asyncio.gather(*(sampler.sample_async(prompt, 1, params) for _ in range(1000)))
                assert len(out) == 1000 and all(len(r.sequences) == 1 for r in out)
                return time.monotonic() - started

        took = run(main, timeout=120)
    assert took < 60
