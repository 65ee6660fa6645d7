"""2000 concurrent sample calls: calls per second, peak RSS of the client, TCP connections to the server.

Server: the LocalServer with the NullEngine (answers at once, computes nothing), in the bench process; each
client runs in its own fresh process. One sample call = ``asample`` + ``retrieve_future`` for a 16-token
prompt, ``max_tokens=16``, ``num_samples=1``.

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
from bench._common import ConnectionSampler, median, peak_rss_mb, port_of, report, row, run_async

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


def run(quick: bool = False) -> list[dict[str, Any]]:
    from bench._servers import null_server

    cfg: dict[str, Any] = {"calls": 50, "rounds": 1} if quick else {}
    with null_server() as srv:
        o = _official.run_ours("sampling", "ours", {**srv.cfg(), **cfg})
        f = (
            {}
            if quick
            else _official.run(
                "sampling", "official", {**cfg, "url": srv.url, "model": srv.model}, env=srv.env()
            )
        )
    notes = [f"{side}: {r['error']}" for side, r in (("ours", o), ("official", f)) if "error" in r]
    note = "; ".join([*notes, f"server: {srv.label}"])
    n = cfg.get("calls", CALLS)
    speed = row(
        f"{n} concurrent sample calls",
        "calls/s",
        o.get("calls_per_s"),
        f.get("calls_per_s"),
        f"≥ {TARGET_X:.0f}x official",
        None,
        better="higher",
        note=note,
    )
    speed["ok"] = None if speed["ratio"] is None else speed["ratio"] >= TARGET_X
    rss = o.get("rss_mb")
    conns = o.get("connections")
    return [
        speed,
        row(
            f"{n} concurrent sample calls: peak RSS",
            "MB",
            rss,
            f.get("rss_mb"),
            f"≤ {TARGET_RSS_MB} MB",
            None if rss is None else rss <= TARGET_RSS_MB,
        ),
        row(
            f"{n} concurrent sample calls: TCP connections",
            "max",
            conns,
            f.get("connections"),
            f"bounded by a setting, default ≤ {TARGET_CONNECTIONS}",
            None if conns is None else conns <= TARGET_CONNECTIONS,
        ),
    ]


if __name__ == "__main__":
    report("concurrent sampling", run())
