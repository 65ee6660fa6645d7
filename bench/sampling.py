"""2000 concurrent sample calls: calls per second, peak RSS of the client, TCP connections to the server.

Server: the LocalServer with the NullEngine (answers at once, computes nothing), in the bench process, in the
hosted dialect (official SDK, floor and ours) and the local one (ours); each client runs in its own fresh
process. The floor (``bench._floor.sampling``) is the same calls in bare aiohttp. One sample call =
``asample`` + ``retrieve_future`` for a 16-token prompt, ``max_tokens=16``, ``num_samples=1``.

- calls/s: 2000 calls started together, until the last result; median of several rounds after a warm-up
  round.
- peak RSS: the client process's VmHWM (/proc/self/status) at the end, imports included.
- connections: the most ESTABLISHED sockets on the server's port at any moment (sampled from /proc/net/tcp
  every 10 ms while the calls run).

- ours: ``asyncio.gather`` of 2000 ``sc.sample_async(...)`` on one ServiceClient (default connection limit).
- official: 2000 ``sc.sample(...)`` futures, then ``.result()`` on each.

Run: ``python -m bench.sampling``.
"""

from __future__ import annotations

import time
from typing import Any

from bench import _official
from bench._common import (
    ConnectionSampler,
    best_of,
    errors,
    median,
    meets,
    peak_rss_mb,
    port_of,
    report,
    row,
    run_async,
)

CALLS = 2000
TARGET_X = 10.0
TARGET_RSS_MB = 150
TARGET_CONNECTIONS = 100
PROMPT = list(range(1, 17))
MAX_TOKENS = 16


async def sample_once(sc: Any, prompt: Any, params: Any) -> Any:
    """One ``sample_async`` call, to its result (whether it returns the result or a future of it)."""
    result = await sc.sample_async(prompt=prompt, num_samples=1, sampling_params=params)
    if not hasattr(result, "sequences"):
        result = await result
    return result


def ours(url: str, api_key: str, model: str, calls: int = CALLS, rounds: int = 3) -> dict[str, Any]:
    import asyncio

    from hpcai_async import ServiceClient, types

    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=MAX_TOKENS)

    async def main() -> tuple[list[float], int]:
        async with ServiceClient(base_url=url, api_key=api_key) as service:
            sc = service.create_sampling_client(base_model=model)
            await asyncio.gather(*(sample_once(sc, prompt, params) for _ in range(max(10, calls // 10))))
            times = []
            with ConnectionSampler(port_of(url)) as conns:
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    results = await asyncio.gather(*(sample_once(sc, prompt, params) for _ in range(calls)))
                    times.append(time.perf_counter() - t0)
                    assert len(results) == calls and len(results[-1].sequences[0].tokens) == MAX_TOKENS
            return times, conns.peak

    times, peak_conns = run_async(main())
    return {"calls_per_s": calls / median(times), "rss_mb": peak_rss_mb(), "connections": peak_conns}


def official(url: str, model: str, calls: int = CALLS, rounds: int = 3) -> dict[str, Any]:
    import hpcai
    from hpcai import types

    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=MAX_TOKENS)
    sc = hpcai.ServiceClient().create_sampling_client(base_model=model)

    def one_round(n: int) -> float:
        t0 = time.perf_counter()
        futures = [sc.sample(prompt=prompt, num_samples=1, sampling_params=params) for _ in range(n)]
        results = [f.result() for f in futures]
        assert len(results) == n and len(results[-1].sequences[0].tokens) == MAX_TOKENS
        return time.perf_counter() - t0

    one_round(max(10, calls // 10))
    with ConnectionSampler(port_of(url)) as conns:
        times = [one_round(calls) for _ in range(rounds)]
    return {"calls_per_s": calls / median(times), "rss_mb": peak_rss_mb(), "connections": conns.peak}


def _measure(cfg: dict[str, Any], quick: bool) -> tuple[dict[str, dict[str, Any]], str]:
    """Every side's figures, keyed ours_hosted / ours_local / floor / official; and the server's label."""
    from bench._servers import MODES, null_server

    got: dict[str, dict[str, Any]] = {"official": {}}
    label = "—"
    for mode in MODES:
        with null_server(mode) as srv:
            if mode != "hosted":
                got[f"ours_{mode}"] = _official.run_ours("sampling", "ours", {**srv.cfg(), **cfg})
                continue
            # ours and the floor interleaved, twice each (see _common.best_of)
            runs = [
                _official.run_ours(module, func, {**srv.cfg(), **cfg})
                for _ in range(2)
                for module, func in (("sampling", "ours"), ("_floor", "sampling"))
            ]
            got["ours_hosted"] = best_of(runs[0::2], "calls_per_s")
            got["floor"] = best_of(runs[1::2], "calls_per_s")
            if not quick:
                official_cfg = {**cfg, "url": srv.url, "model": srv.model}
                got["official"] = _official.run("sampling", "official", official_cfg, env=srv.env())
            label = srv.label
    return got, label


def run(quick: bool = False) -> list[dict[str, Any]]:
    cfg: dict[str, Any] = {"calls": 50, "rounds": 1} if quick else {}
    got, label = _measure(cfg, quick)
    hosted, local, floor, f = got["ours_hosted"], got["ours_local"], got["floor"], got["official"]
    notes = errors(**got)
    floor_note = (
        "floor: bare aiohttp (100-connection pool); ours and floor: the better of two interleaved runs"
    )
    note = "; ".join([*notes, f"{floor_note}; server: {label}"])
    n = cfg.get("calls", CALLS)
    speed = row(
        f"{n} concurrent sample calls",
        "calls/s",
        hosted.get("calls_per_s"),
        f.get("calls_per_s"),
        f"≥ {TARGET_X:.0f}x official",
        None,
        better="higher",
        note=note,
        local=local.get("calls_per_s"),
        floor=floor.get("calls_per_s"),
    )
    speed["ok"] = meets(speed, TARGET_X, None, TARGET_X)
    rss = row(
        f"{n} concurrent sample calls: peak RSS",
        "MB",
        hosted.get("rss_mb"),
        f.get("rss_mb"),
        f"≤ {TARGET_RSS_MB} MB",
        None,
        local=local.get("rss_mb"),
        floor=floor.get("rss_mb"),
    )
    conns = row(
        f"{n} concurrent sample calls: TCP connections",
        "max",
        hosted.get("connections"),
        f.get("connections"),
        f"bounded by a setting, default ≤ {TARGET_CONNECTIONS}",
        None,
        local=local.get("connections"),
        floor=floor.get("connections"),
    )
    rss["ok"] = _within(rss, TARGET_RSS_MB)
    conns["ok"] = _within(conns, TARGET_CONNECTIONS)
    return [speed, rss, conns]


def _within(r: dict[str, Any], limit: float) -> bool | None:
    """Both of our modes at or under ``limit`` (None when neither was measured)."""
    got = [v for v in (r["ours"], r["local"]) if v is not None]
    return None if not got else all(v <= limit for v in got)


if __name__ == "__main__":
    report("concurrent sampling", run())
