"""Submit -> result latency of one forward_backward when the server needs exactly 50 ms for the job.

Server: the LocalServer with a NullEngine whose forward_backward sleeps 50 ms on the device thread (no
training), in the hosted dialect (official SDK, floor, ours) and the local one (ours), each in two polling
behaviours:

- long-poll: retrieve_future is held until the job is done (``long_poll_s=25``);
- try_again: retrieve_future answers ``{"type": "try_again"}`` at once while the job runs (``long_poll_s=0``;
  the official SDK then sleeps 0.5 s before it polls again; ours re-polls at once for the first 5 ms, then
  after ~10 % of the time waited so far).

Sequential calls, each timed from the call to the result in hand; median after warm-up calls. The floor
(``bench._floor.latency``) is bare http.client: the submit, then polls back to back until the result.
(``bench._fixture`` is the same two behaviours without the LocalServer, for the smoke test.) Run: ``python -m
bench.latency``."""

from __future__ import annotations

import time
from typing import Any

from bench import _official
from bench._common import errors, median, report, row, run_async

SERVER_S = 0.050
TARGET_X = 1.1  # x the job time, hosted and local modes (issue 13)


def ours(url: str, api_key: str, model: str, n: int = 15, warmup: int = 3) -> dict[str, Any]:
    from hpcai_async import ServiceClient, types

    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1.0, 1.0, 1.0, 1.0]},
    )

    async def main() -> list[float]:
        async with ServiceClient(base_url=url, api_key=api_key) as service:
            tc = await service.create_lora_training_client_async(model, rank=8)
            out = []
            for i in range(warmup + n):
                t0 = time.perf_counter()
                fut = await tc.forward_backward_async([datum], "cross_entropy")
                await fut
                if i >= warmup:
                    out.append(time.perf_counter() - t0)
            return out

    times = run_async(main())
    return {"ms": median(times) * 1e3, "max_ms": max(times) * 1e3}


def official(model: str, n: int = 15, warmup: int = 3) -> dict[str, Any]:
    import hpcai
    from hpcai import types

    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[2, 3, 4, 5], dtype="int64", shape=[4]),
            "weights": types.TensorData(data=[1.0, 1.0, 1.0, 1.0], dtype="float32", shape=[4]),
        },
    )
    tc = hpcai.ServiceClient().create_lora_training_client(base_model=model, rank=8)
    out = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        tc.forward_backward([datum], "cross_entropy").result()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return {"ms": median(out) * 1e3, "max_ms": max(out) * 1e3}


def run(quick: bool = False) -> list[dict[str, Any]]:
    from bench._servers import MODES, null_server, slow_null_engine

    cfg: dict[str, Any] = {"n": 3, "warmup": 1} if quick else {}
    rows = []
    for poll, long_poll_s in (("long_poll", 25.0), ("try_again", 0.0)):
        ours: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            engine = slow_null_engine(SERVER_S)
            with null_server(mode, engine=engine, long_poll_s=long_poll_s) as srv:
                ours[mode] = _official.run_ours("latency", "ours", {**srv.cfg(), **cfg})
                if mode == "hosted":
                    floor = _official.run_ours("_floor", "latency", {**srv.cfg(), **cfg})
                    f = (
                        {}
                        if quick
                        else _official.run("latency", "official", {**cfg, "model": srv.model}, env=srv.env())
                    )
                    label = srv.label
        notes = errors(ours_hosted=ours["hosted"], ours_local=ours["local"], official=f, floor=floor)
        notes.append(f"floor: bare http.client, submit then poll at once until the result; server: {label}")
        how = "long-poll" if poll == "long_poll" else "try_again at once"
        limit = TARGET_X * SERVER_S * 1e3
        r = row(
            f"submit→result, server needs 50 ms, {how}",
            "ms",
            ours["hosted"].get("ms"),
            f.get("ms"),
            f"≤ {TARGET_X}x the job time ({limit:.0f} ms), both modes",
            None,
            note="; ".join(notes),
            local=ours["local"].get("ms"),
            floor=floor.get("ms"),
        )
        got = [v for v in (r["ours"], r["local"]) if v is not None]
        r["ok"] = None if not got else all(v <= limit for v in got)
        rows.append(r)
    return rows


if __name__ == "__main__":
    report("submit → result latency", run())
