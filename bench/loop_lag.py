"""Event-loop lag while 10,000 sample calls are in flight (ours only: the official SDK has its own thread).

A ticker task on the caller's loop repeatedly awaits ``asyncio.sleep(0.001)`` and records how late it wakes
(overshoot beyond 1 ms) while 10,000 ``sample_async`` calls, started together, run to completion against the
LocalServer with the NullEngine. Reports the 99th percentile (and the maximum) of the overshoot. Run:
``python -m bench.loop_lag``.
"""

from __future__ import annotations

import time
from typing import Any

from bench import _official
from bench._common import percentile, report, row, run_async

CALLS = 10_000
TARGET_P99_MS = 10.0


def ours(url: str, api_key: str, model: str, calls: int = CALLS) -> dict[str, Any]:
    import asyncio

    from bench.sampling import MAX_TOKENS, PROMPT, sample_once
    from hpcai_async import ServiceClient, types

    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=MAX_TOKENS)

    async def main() -> tuple[list[float], float]:
        async with ServiceClient(base_url=url, api_key=api_key) as service:
            sc = service.create_sampling_client(base_model=model)
            await asyncio.gather(*(sample_once(sc, prompt, params) for _ in range(100)))  # warm-up
            lags: list[float] = []
            done = asyncio.Event()

            async def ticker() -> None:
                while not done.is_set():
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.001)
                    lags.append(time.perf_counter() - t0 - 0.001)

            tick = asyncio.create_task(ticker())
            t0 = time.perf_counter()
            results = await asyncio.gather(*(sample_once(sc, prompt, params) for _ in range(calls)))
            wall = time.perf_counter() - t0
            done.set()
            await tick
            assert len(results) == calls
            return lags, wall

    lags, wall = run_async(main())
    return {
        "p99_ms": percentile(lags, 99) * 1e3,
        "p50_ms": percentile(lags, 50) * 1e3,
        "max_ms": max(lags) * 1e3,
        "ticks": len(lags),
        "wall_s": wall,
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    from bench._servers import null_server

    cfg: dict[str, Any] = {"calls": 200} if quick else {}
    with null_server() as srv:
        o = _official.run_ours("loop_lag", "ours", {**srv.cfg(), **cfg})
    notes = (
        [f"ours: {o['error']}"]
        if "error" in o
        else [
            f"p50 {o['p50_ms']:.2f} ms, max {o['max_ms']:.1f} ms over {o['ticks']} ticks; "
            f"{cfg.get('calls', CALLS)} calls took {o['wall_s']:.1f} s"
        ]
    )
    notes.append(f"server: {srv.label}")
    p99 = o.get("p99_ms")
    return [
        row(
            f"event-loop lag, {cfg.get('calls', CALLS):,} sample calls in flight (p99)",
            "ms",
            p99,
            None,
            f"p99 ≤ {TARGET_P99_MS:.0f} ms",
            None if p99 is None else p99 <= TARGET_P99_MS,
            note="; ".join(notes),
        ),
    ]


if __name__ == "__main__":
    report("event-loop lag", run())
