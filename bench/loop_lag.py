"""Event-loop lag while 10,000 sample calls are in flight (ours only: the official SDK has its own thread).

A ticker task on the caller's loop repeatedly awaits ``asyncio.sleep(0.001)`` and records how late it wakes
(overshoot beyond 1 ms) while 10,000 ``sample_async`` calls, started together, run to completion against the
LocalServer with the NullEngine (hosted and local dialects; the floor: bare aiohttp doing the same calls on
the same loop, ``bench._floor.loop_lag``). Reports the 99th percentile (and the maximum) of the overshoot.
Run: ``python -m bench.loop_lag``."""

from __future__ import annotations

import time
from typing import Any

from bench import _official
from bench._common import errors, percentile, report, row, run_async

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
    from bench._servers import MODES, null_server

    cfg: dict[str, Any] = {"calls": 200} if quick else {}
    ours: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        with null_server(mode) as srv:
            ours[mode] = _official.run_ours("loop_lag", "ours", {**srv.cfg(), **cfg})
            if mode == "hosted":
                floor = _official.run_ours("_floor", "loop_lag", {**srv.cfg(), **cfg})
                label = srv.label
    o = ours["hosted"]
    notes = errors(ours_hosted=o, ours_local=ours["local"], floor=floor)
    if "error" not in o:
        notes.append(
            f"hosted: p50 {o['p50_ms']:.2f} ms, max {o['max_ms']:.1f} ms over {o['ticks']} ticks; "
            f"{cfg.get('calls', CALLS)} calls took {o['wall_s']:.1f} s"
        )
    notes.append(f"no official figure (its calls run on a thread of its own); server: {label}")
    p99, local = o.get("p99_ms"), ours["local"].get("p99_ms")
    got = [v for v in (p99, local) if v is not None]
    return [
        row(
            f"event-loop lag, {cfg.get('calls', CALLS):,} sample calls in flight (p99)",
            "ms",
            p99,
            None,
            f"p99 ≤ {TARGET_P99_MS:.0f} ms",
            None if not got else all(v <= TARGET_P99_MS for v in got),
            note="; ".join(notes),
            local=local,
            floor=floor.get("p99_ms"),
        ),
    ]


if __name__ == "__main__":
    report("event-loop lag", run())
