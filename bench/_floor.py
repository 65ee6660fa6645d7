"""The floor beside every client-overhead row: the same protocol steps done by a bare script, no client logic.

What a client cannot beat on the same transport: the hosted dialect's requests (PROTOCOL.md §3, §5-§6) sent
with raw ``aiohttp`` (concurrent rows: one ``ClientSession`` with aiohttp's default 100-connection pool) or
raw ``http.client`` (sequential rows: one keep-alive connection), the bodies ``msgspec.json``-encoded from
ready Python lists, the answers ``msgspec.json``-decoded into dicts and checked for the one field the row
needs. No retries, no ordering logic beyond "the next submit goes once the previous one returned" (what the
hosted protocol needs to keep a model's requests in order), no types, no futures, no error handling.

Every function runs in a child of our venv (``_official.run_ours``) and returns what the bench reports.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

from bench._common import median, percentile, run_async

# Keys unique to this process: the server remembers keys, so a second run against the same server with the
# same keys would get every answer from its idempotency records (no new job) and measure that instead.
_RUN = uuid.uuid4().hex[:12]
_keys = (f"floor-{_RUN}-{n}" for n in itertools.count(1))


def _datum_json(tokens: int) -> dict[str, Any]:
    """One cross-entropy datum in wire form, as bench.pipeline's (token ids 1..N, weights 1)."""
    ids = [i % 1000 for i in range(1, tokens + 2)]
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": ids[:-1]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": ids[1:], "dtype": "int64", "shape": [tokens]},
            "weights": {"data": [1.0] * tokens, "dtype": "float32", "shape": [tokens]},
        },
    }


class _Aio:
    """Bare aiohttp: POST a JSON body, decode the JSON answer; submit + poll a future until its result."""

    def __init__(self, session: Any, url: str) -> None:
        import msgspec

        self.session = session
        self.url = url.rstrip("/") + "/api/v1/"
        self.encode = msgspec.json.encode
        self.decode = msgspec.json.decode

    async def post(self, path: str, body: dict[str, Any], key: str | None = None) -> Any:
        headers = {"X-Idempotency-Key": key or next(_keys)}
        async with self.session.post(self.url + path, data=self.encode(body), headers=headers) as resp:
            payload = await resp.read()
            assert resp.status == 200, payload[:200]
        return self.decode(payload)

    async def result(self, request_id: str, model_id: str | None = None) -> Any:
        body: dict[str, Any] = {"request_id": request_id}
        if model_id is not None:
            body["model_id"] = model_id
        while True:
            out = await self.post("retrieve_future", body)
            if out.get("type") != "try_again":
                return out

    async def call(self, path: str, body: dict[str, Any], model_id: str | None = None) -> Any:
        submitted = await self.post(path, body)
        return await self.result(submitted["request_id"], model_id)


async def _session(api_key: str) -> Any:
    import aiohttp

    headers = {"X-API-Key": api_key, "Content-Type": "application/json", "Accept": "application/json"}
    return aiohttp.ClientSession(headers=headers)


async def _create_model(aio: _Aio, model: str) -> str:
    body = {"base_model": model, "type": "create_model", "lora_config": {"rank": 8}}
    out = await aio.call("create_model", body)
    model_id: str = out["model_id"]
    return model_id


def pipeline(url: str, api_key: str, model: str, calls: int = 200, rounds: int = 5) -> dict[str, Any]:
    """bench.pipeline's round in bare aiohttp: calls x (forward_backward, optim_step) submitted in order (each
    once the previous one returned), then every result, in the better of two bare ways to poll.

    "eager" starts each poll as soon as its submit returned (what both SDKs do); "after" starts them all once
    the last submit returned. On one loopback server the polls compete with the ordered submits, so "after"
    was 13-37 % faster in our runs; the floor is the better of the two in each run (rounds interleaved).
    """
    import asyncio

    datum = _datum_json(128)

    async def main() -> dict[str, list[tuple[float, float]]]:
        async with await _session(api_key) as session:
            aio = _Aio(session, url)
            model_id = await _create_model(aio, model)
            fb = {
                "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"},
                "model_id": model_id,
            }
            opt = {"adam_params": {"learning_rate": 1e-4}, "model_id": model_id}

            async def one_round(n: int, eager: bool) -> tuple[float, float]:
                t0, c0 = time.perf_counter(), time.process_time()
                polls: list[Any] = []
                for _ in range(n):
                    for path, body in (("forward_backward", fb), ("optim_step", opt)):
                        rid = (await aio.post(path, body))["request_id"]
                        polls.append(asyncio.ensure_future(aio.result(rid, model_id)) if eager else rid)
                results = await asyncio.gather(*(p if eager else aio.result(p, model_id) for p in polls))
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                assert len(results) == 2 * n and results[0]["loss_fn_outputs"]
                return dt, cpu

            out: dict[str, list[tuple[float, float]]] = {"eager": [], "after": []}
            await one_round(max(10, calls // 4), True)
            for _ in range(rounds):
                for way in out:
                    out[way].append(await one_round(calls, way == "eager"))
            return out

    from bench.pipeline import _result

    ways = {way: _result(r, calls) for way, r in run_async(main()).items()}
    best = max(ways, key=lambda way: ways[way]["calls_per_s"])
    return {**ways[best], "way": best, "ways": {w: r["calls_per_s"] for w, r in ways.items()}}


def _sample_body(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    params = {
        "max_tokens": max_tokens,
        "seed": None,
        "stop": None,
        "temperature": 1.0,
        "top_k": -1,
        "top_p": 1.0,
    }
    return {
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": params,
        "num_samples": 1,
        "base_model": model,
        "prompt_logprobs": False,
    }


def sampling(
    url: str, api_key: str, model: str, calls: int = 2000, rounds: int = 3, max_tokens: int = 16
) -> dict[str, Any]:
    """bench.sampling's round in bare aiohttp: ``calls`` asample + retrieve_future started together."""
    import asyncio

    from bench._common import ConnectionSampler, peak_rss_mb, port_of

    body = _sample_body(model, list(range(1, 17)), max_tokens)

    async def main() -> tuple[list[float], int]:
        async with await _session(api_key) as session:
            aio = _Aio(session, url)
            await asyncio.gather(*(aio.call("asample", body) for _ in range(max(10, calls // 10))))
            times = []
            with ConnectionSampler(port_of(url)) as conns:
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    results = await asyncio.gather(*(aio.call("asample", body) for _ in range(calls)))
                    times.append(time.perf_counter() - t0)
                    assert len(results[-1]["sequences"][0]["tokens"]) == max_tokens
            return times, conns.peak

    times, peak = run_async(main())
    return {"calls_per_s": calls / median(times), "rss_mb": peak_rss_mb(), "connections": peak}


def loop_lag(url: str, api_key: str, model: str, calls: int = 10_000) -> dict[str, Any]:
    """bench.loop_lag in bare aiohttp: the ticker's overshoot while ``calls`` asample calls run."""
    import asyncio

    body = _sample_body(model, list(range(1, 17)), 16)

    async def main() -> list[float]:
        async with await _session(api_key) as session:
            aio = _Aio(session, url)
            await asyncio.gather(*(aio.call("asample", body) for _ in range(100)))
            lags: list[float] = []
            done = asyncio.Event()

            async def ticker() -> None:
                while not done.is_set():
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.001)
                    lags.append(time.perf_counter() - t0 - 0.001)

            tick = asyncio.create_task(ticker())
            await asyncio.gather(*(aio.call("asample", body) for _ in range(calls)))
            done.set()
            await tick
            return lags

    lags = run_async(main())
    return {"p99_ms": percentile(lags, 99) * 1e3}


class _Conn:
    """Bare http.client: one keep-alive connection, JSON in and out."""

    def __init__(self, url: str, api_key: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        import msgspec

        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
        self.prefix = parts.path.rstrip("/") + "/api/v1/"
        self.headers = {
            "X-API-Key": api_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self.encode = msgspec.json.encode
        self.decode = msgspec.json.decode

    def post(self, path: str, body: dict[str, Any]) -> Any:
        headers = {**self.headers, "X-Idempotency-Key": next(_keys)}
        self.conn.request("POST", self.prefix + path, self.encode(body), headers)
        resp = self.conn.getresponse()
        payload = resp.read()
        assert resp.status == 200, payload[:200]
        return self.decode(payload)

    def call(self, path: str, body: dict[str, Any], model_id: str | None = None) -> Any:
        poll: dict[str, Any] = {"request_id": self.post(path, body)["request_id"]}
        if model_id is not None:
            poll["model_id"] = model_id
        while True:
            out = self.post("retrieve_future", poll)
            if out.get("type") != "try_again":
                return out


def latency(url: str, api_key: str, model: str, n: int = 15, warmup: int = 3) -> dict[str, Any]:
    """bench.latency in bare http.client: forward_backward submit, then poll until the result."""
    conn = _Conn(url, api_key)
    body = {"base_model": model, "type": "create_model", "lora_config": {"rank": 8}}
    model_id = conn.call("create_model", body)["model_id"]
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3, 4]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": [2, 3, 4, 5], "dtype": "int64", "shape": [4]},
            "weights": {"data": [1.0] * 4, "dtype": "float32", "shape": [4]},
        },
    }
    fb = {"forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"}, "model_id": model_id}
    out = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            result = conn.call("forward_backward", fb, model_id)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
            assert "loss_fn_outputs" in result, result
    finally:
        conn.conn.close()
    return {"ms": median(out) * 1e3}
