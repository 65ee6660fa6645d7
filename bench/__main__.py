"""``python -m bench``: every benchmark, ours in two server modes beside the official SDK, one table.

    python -m bench                  # all (~7 min): writes bench/results/latest.json and the README table
    python -m bench codec sampling   # just these (results go to bench/results/partial.tmp)
    python -m bench --quick          # tiny sizes, ours only where the official side is slow (a smoke run)
    python -m bench --uvloop         # our side on uvloop (an optional extra) instead of plain asyncio

The official SDK runs in its own venv (bench/.venv-official, made on first use; see bench/_official.py), the
upstream tinker 0.38 SDK's codec in another (bench/.venv-tinker; bench/_tinker.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import re
import sys
import time
from typing import Any

from bench import _official, _tinker
from bench._common import RESULTS_DIR, ROOT, machine, table

BENCHES = (
    "import_time",
    "footprint",
    "codec",
    "pipeline",
    "latency",
    "sampling",
    "sync_calls",
    "loop_lag",
    "engine",
    "grpo",
)
README = ROOT / "bench" / "README.md"
_START, _END = "<!-- results:start -->", "<!-- results:end -->"


def run(names: list[str], *, quick: bool) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for name in names:
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        mod = importlib.import_module(f"bench.{name}")
        try:
            got = mod.run(quick=quick)
        except Exception as exc:  # one broken bench must not hide the others' numbers
            got = [
                {
                    "metric": name,
                    "unit": "",
                    "ours": None,
                    "official": None,
                    "ratio": None,
                    "target": "",
                    "ok": False,
                    "better": "lower",
                    "note": f"bench crashed: {exc!r}",
                }
            ]
        for r in got:
            r["bench"] = name
        rows.extend(got)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(table(got).split("\n", 2)[2], file=sys.stderr, flush=True)
    return rows, seconds


def update_readme(text: str) -> None:
    if not README.exists():
        return
    body = README.read_text()
    if _START not in body or _END not in body:
        return
    new = re.sub(
        re.escape(_START) + ".*?" + re.escape(_END), lambda _: f"{_START}\n{text}\n{_END}", body, flags=re.S
    )
    README.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benches to run (default: all): {', '.join(BENCHES)}"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes; skips the slow official runs")
    parser.add_argument("--uvloop", action="store_true", help="our side on uvloop instead of plain asyncio")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    names = args.names or list(BENCHES)
    if args.uvloop:
        os.environ["BENCH_UVLOOP"] = "1"
    started = dt.datetime.now(dt.UTC)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"[bench] warning: load average {load:.1f} — other work on this machine makes numbers noisy",
            file=sys.stderr,
        )
    py, reason = _official.python()
    rows, seconds = run(names, quick=args.quick)
    tinker = _tinker.resolved() or (None, "not run (only the codec bench uses it)")
    info = machine()
    result = {
        "date": started.isoformat(timespec="seconds"),
        "machine": info,
        "load_avg_at_start": round(load, 2),
        "event_loop": "uvloop" if args.uvloop else "asyncio",
        "quick": args.quick,
        "official_python": py,
        "official_missing": reason or None,
        "tinker_python": tinker[0],
        "tinker_missing": tinker[1] or None,
        "modes": {"hosted": "LocalServer(dialect='hosted'): no extensions", "local": "every extension"},
        "seconds": seconds,
        "rows": rows,
    }
    full = not args.quick and not args.names
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / ("latest.json" if full else "partial.tmp")  # *.tmp is git-ignored
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    head = (
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {info['cpu']} ({info['cores']} cores, "
        f"{info['memory_gb']} GB), Python {info['python']}, our side on {result['event_loop']}; "
        "ratio = how many times better ours is (higher is better), medians after warm-up. "
        "**ours, hosted**: our client against the local server in the hosted service's terms (no protocol "
        "extensions), where the official SDK runs too; **ours, local**: the same client with every "
        "extension; "
        "**floor**: a bare script doing the same protocol steps (raw aiohttp / http.client, or plain msgspec "
        "for the codec); ours/floor: 1.00x = as fast as the bare script."
    )
    text = head + "\n\n" + table(rows)
    if reason:
        text += f"\n\nThe official SDK was not measured: {reason}"
    print("\n" + text)
    print(f"\n[bench] wrote {out.relative_to(ROOT)}", file=sys.stderr)
    if full:
        update_readme(text)


if __name__ == "__main__":
    main()
