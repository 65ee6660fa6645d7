"""1000 sequential synchronous get_info calls: microseconds per call, against raw ``http.client``.

Server: the LocalServer with the NullEngine, in the bench process, hosted dialect (the official SDK, the
floor and ours) and local dialect (ours, with seq_id). get_info is answered directly (no
future), so this measures the per-call cost of each client's synchronous path: ours hands the coroutine to
its private loop thread and waits; the official SDK does the same with its own background loop, plus its
turn-taking and retry layers. The baseline is the floor for any Python client: a keep-alive
``http.client.HTTPConnection`` posting the same JSON body and ``json.loads``-ing the answer, in the same
process as ours, rounds interleaved with ours.

Median of several rounds of 1000 calls after 100 warm-up calls. Run: ``python -m bench.sync_calls``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

from bench import _official
from bench._common import errors, median, report, row, run_async

CALLS = 1000
TARGET_X = 1.3


class RawClient:
    """The floor: one keep-alive ``http.client`` connection posting get_info, ``json.loads`` of the answer.

    With ``seq=True`` it sends what our client sends to a server that speaks the seq_id extension (a
    ``seq_id`` and an idempotency key), so both take the same path through the server; its own model keeps
    its own sequence.
    """

    def __init__(self, url: str, api_key: str, model_id: str, *, seq: bool) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
        self.path = parts.path.rstrip("/") + "/api/v1/get_info"
        self.headers = {
            "X-API-Key": api_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self.model_id = model_id
        self.seq = 1 if seq else None

    def round(self, n: int) -> float:
        import json

        plain = json.dumps({"model_id": self.model_id}).encode()
        t0 = time.perf_counter()
        for _ in range(n):
            body, headers = plain, self.headers
            if self.seq is not None:
                body = json.dumps({"model_id": self.model_id, "seq_id": self.seq}).encode()
                headers = {**self.headers, "X-Idempotency-Key": f"raw:{self.model_id}:{self.seq}"}
                self.seq += 1
            self.conn.request("POST", self.path, body, headers)
            resp = self.conn.getresponse()
            info = json.loads(resp.read())
            assert resp.status == 200 and info["model_id"] == self.model_id, info
        return time.perf_counter() - t0


def ours(url: str, api_key: str, model: str, calls: int = CALLS, rounds: int = 5) -> dict[str, Any]:
    from hpcai_async import ServiceClient

    with ServiceClient(base_url=url, api_key=api_key) as service:
        seq = "seq_id" in service.get_server_capabilities().features
        tc = service.create_lora_training_client(model, rank=8)
        # the same requests as ours, on a model of its own (its seq_ids), and the plain request
        raw_same = RawClient(
            url, api_key, service.create_lora_training_client(model, rank=8).model_id, seq=seq
        )
        raw_plain = RawClient(url, api_key, tc.model_id, seq=False)
        raw_same.round(100)
        raw_plain.round(100)
        for _ in range(100):
            tc.get_info()
        ours_t, same_t, plain_t = [], [], []
        for _ in range(rounds):
            same_t.append(raw_same.round(calls))
            plain_t.append(raw_plain.round(calls))
            t0 = time.perf_counter()
            for _ in range(calls):
                info = tc.get_info()
            ours_t.append(time.perf_counter() - t0)
            assert info.model_id == tc.model_id
    per_call = 1e6 / calls

    async def same_calls_async() -> tuple[list[float], list[float]]:
        # the same calls awaited on the caller's loop (what the sync wrapper adds is the difference), and a
        # bare aiohttp session posting the same bodies (what the client adds over its HTTP library)
        import json

        import aiohttp

        async with ServiceClient(base_url=url, api_key=api_key) as service:
            tc = await service.create_lora_training_client_async(model, rank=8)
            bare_model = (await service.create_lora_training_client_async(model, rank=8)).model_id
            headers = {"X-API-Key": api_key, "Content-Type": "application/json"}
            next_seq = 1
            async with aiohttp.ClientSession(headers=headers) as session:

                async def bare() -> None:
                    nonlocal next_seq
                    body: dict[str, Any] = {"model_id": bare_model}
                    extra = {}
                    if seq:
                        body["seq_id"] = next_seq
                        extra["X-Idempotency-Key"] = f"bare:{bare_model}:{next_seq}"
                        next_seq += 1
                    async with session.post(
                        f"{url}/api/v1/get_info", data=json.dumps(body), headers=extra
                    ) as r:
                        assert r.status == 200, await r.text()
                        json.loads(await r.read())

                for _ in range(100):
                    await tc.get_info_async()
                    await bare()
                ours_out, bare_out = [], []
                for _ in range(max(1, rounds // 2)):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        await bare()
                    bare_out.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        await tc.get_info_async()
                    ours_out.append(time.perf_counter() - t0)
            return ours_out, bare_out

    async_t, bare_t = run_async(same_calls_async())
    return {
        "us": median(ours_t) * per_call,
        "async_us": median(async_t) * per_call,
        "aiohttp_us": median(bare_t) * per_call,
        "raw_us": median(same_t) * per_call,
        "raw_plain_us": median(plain_t) * per_call,
        "seq": seq,
    }


def official(model: str, calls: int = CALLS, rounds: int = 5) -> dict[str, Any]:
    import hpcai

    tc = hpcai.ServiceClient().create_lora_training_client(base_model=model, rank=8)
    for _ in range(100):
        tc.get_info()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            tc.get_info()
        times.append(time.perf_counter() - t0)
    return {"us": median(times) / calls * 1e6}


def run(quick: bool = False) -> list[dict[str, Any]]:
    from bench._servers import MODES, null_server

    cfg: dict[str, Any] = {"calls": 50, "rounds": 1} if quick else {}
    ours: dict[str, dict[str, Any]] = {}
    uv: dict[str, Any] = {}
    for mode in MODES:
        with null_server(mode) as srv:
            ours[mode] = _official.run_ours("sync_calls", "ours", {**srv.cfg(), **cfg})
            if mode != "hosted":
                continue
            if os.environ.get("BENCH_UVLOOP") != "1" and importlib.util.find_spec("uvloop") is not None:
                # the same on the [uvloop] extra, in the same run: the thread hop is what differs most
                uv = _official.run_ours(
                    "sync_calls", "ours", {**srv.cfg(), **cfg}, env={"HPCAI_ASYNC_NO_UVLOOP": "0"}
                )
            f = (
                {}
                if quick
                else _official.run("sync_calls", "official", {**cfg, "model": srv.model}, env=srv.env())
            )
            label = srv.label
    o, local = ours["hosted"], ours["local"]
    notes = errors(ours_hosted=o, ours_local=local, official=f)
    us, raw = o.get("us"), o.get("raw_us")
    if raw:
        notes.append(
            f"floor: raw http.client posting the same get_info body, same process, rounds interleaved; "
            f"hosted: ours awaiting get_info_async on the caller's loop: {o['async_us']:.0f} µs/call; "
            f"bare aiohttp session, same body: {o['aiohttp_us']:.0f} µs/call"
        )
    if local.get("raw_us"):
        notes.append(
            f"local (with seq_id): raw http.client sending the same body as ours "
            f"{local['raw_us']:.0f} µs/call "
            f"→ ours = {local['us'] / local['raw_us']:.2f}x raw"
        )
    if uv.get("us") and uv.get("raw_us"):
        notes.append(
            f"hosted with the [uvloop] extra, same run: {uv['us']:.0f} µs/call vs raw {uv['raw_us']:.0f} → "
            f"{uv['us'] / uv['raw_us']:.2f}x raw"
        )
    notes.append(f"server: {label}")
    return [
        row(
            f"{cfg.get('calls', CALLS)} sequential sync get_info",
            "µs/call",
            us,
            f.get("us"),
            f"≤ {TARGET_X}x the raw http.client floor",
            None if us is None or raw is None else us <= TARGET_X * raw,
            note="; ".join(notes),
            local=local.get("us"),
            floor=raw,
        ),
    ]


if __name__ == "__main__":
    report("sequential synchronous calls", run())
