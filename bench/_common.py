"""Shared bench helpers: timing, process metrics, child-process protocol, the results table.

Imports only the standard library and numpy, because the official SDK's measurements import this module too,
inside the official venv, where hpcai_async's dependencies are not installed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
RESULT_MARK = "BENCH-RESULT "

# Sizes from the issue: one forward_backward request of 64 datums x 2048 tokens.
BATCH = 64
SEQ = 2048
VOCAB = 151_936  # Qwen3's vocabulary: token ids are realistic 6-digit numbers
MODEL = "bench/null-model"


# -------------------------------------------------------------------------------- timing


def timeit(fn: Callable[[], Any], *, repeat: int = 7, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn`` for ``repeat`` runs after ``warmup`` discarded ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def run_async(coro: Any) -> Any:
    """``asyncio.run`` for our side: plain asyncio, or uvloop when the bench runs with ``--uvloop``.

    The core install has no uvloop (it is an extra), so the default numbers are plain asyncio's.
    """
    import asyncio

    if os.environ.get("HPCAI_ASYNC_NO_UVLOOP", "") in ("1", "true", "yes"):
        return asyncio.run(coro)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# -------------------------------------------------------------------------------- process metrics


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM from /proc/self/status), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def established_to(port: int) -> int:
    """How many established TCP connections the server on ``port`` holds, from /proc/net/tcp and tcp6.

    Counted as pairs: a server-side socket (local port ``port``) whose peer is a socket of this machine
    connected back to it, so a stray socket of another process that happens to use the same port number
    is not counted.
    """
    ends: set[tuple[str, str]] = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "01":  # ESTABLISHED; parts[1] local, parts[2] remote ("HEXADDR:HEXPORT")
                        ends.add((parts[1], parts[2]))
        except FileNotFoundError:
            pass
    return sum(
        1 for local, remote in ends if int(local.rsplit(":", 1)[1], 16) == port and (remote, local) in ends
    )


class ConnectionSampler:
    """Samples ``established_to(port)`` from a thread every ``interval`` s; ``peak`` is the maximum seen."""

    def __init__(self, port: int, interval: float = 0.01) -> None:
        self.port = port
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, established_to(self.port))
            self._stop.wait(self.interval)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, established_to(self.port))


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1].split("/")[0])


# -------------------------------------------------------------------------------- data


def make_batch(batch: int = BATCH, seq: int = SEQ, *, seed: int = 0) -> dict[str, Any]:
    """Numpy inputs of one SFT forward_backward: tokens, targets, and 0/1 weights (prompt masked)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, VOCAB, size=(batch, seq + 1), dtype=np.int64)
    weights = np.ones((batch, seq), dtype=np.float32)
    weights[:, : seq // 4] = 0.0
    return {"tokens": seqs[:, :-1].copy(), "targets": seqs[:, 1:].copy(), "weights": weights}


def make_output_arrays(batch: int = BATCH, seq: int = SEQ, *, seed: int = 1) -> tuple[Any, Any]:
    """Per-datum logprobs and elementwise_loss as a server computes them (float32, arbitrary values)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    logprobs = (-rng.exponential(3.0, size=(batch, seq))).astype(np.float32)
    weights = np.ones((batch, seq), dtype=np.float32)
    weights[:, : seq // 4] = 0.0
    return logprobs, (-logprobs * weights).astype(np.float32)


# -------------------------------------------------------------------------------- child processes


def emit(result: dict[str, Any]) -> None:
    """Hand a child's result to the parent (the last line starting with RESULT_MARK wins)."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(
    python: str,
    module: str,
    func: str,
    cfg: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run ``bench.<module>.<func>(**cfg)`` in a fresh interpreter ``python``; return its emitted dict.

    A failure comes back as ``{"error": "..."}`` (with the child's stderr tail) instead of raising, so that
    one broken side does not hide the other side's numbers.
    """
    cmd = [python, "-m", "bench._child", module, func, json.dumps(cfg or {})]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{module}.{func} timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            out: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"{module}.{func} exited {proc.returncode}: " + " | ".join(tail)}


# -------------------------------------------------------------------------------- rows and table


def row(
    metric: str,
    unit: str,
    ours: float | None,
    official: float | None,
    target: str,
    ok: bool | None,
    *,
    better: str = "lower",
    note: str = "",
    local: float | None = None,
    floor: float | None = None,
) -> dict[str, Any]:
    """One line of the results table. Every ratio is "how many times better ours is" (>1 = ours wins).

    ``ours`` is our client against the server in the hosted service's terms (no protocol extensions), the
    mode the official SDK always runs in; ``local`` the same client against our server with every extension;
    ``floor`` what a bare script doing the same protocol steps with no client logic gets (``of_floor`` = how
    close ours comes to it: 1.0 = as fast as the bare script).
    """
    return {
        "metric": metric,
        "unit": unit,
        "ours": ours,
        "official": official,
        "ratio": better_by(ours, official, better),
        "local": local,
        "local_ratio": better_by(local, official, better),
        "floor": floor,
        "of_floor": better_by(ours, floor, better),
        "target": target,
        "ok": ok,
        "better": better,
        "note": note,
    }


def better_by(ours: float | None, other: float | None, better: str) -> float | None:
    """How many times better ``ours`` is than ``other`` (None when either is missing)."""
    if ours is None or other is None or ours <= 0 or other <= 0:
        return None
    return other / ours if better == "lower" else ours / other


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if x != x:  # nan
        return "nan"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _x(ratio: float | None, digits: int = 1) -> str:
    """A ratio as ``12.3x``; below 1 with two decimals (``0.04x``), so a loss never reads as ``0.0x``."""
    if ratio is None:
        return "—"
    return f"{ratio:.{max(digits, 2) if ratio < 1 else digits}f}x"


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (readable in a terminal too): hosted mode first, then floor and local."""
    head = [
        "metric",
        "ours, hosted",
        "official",
        "ratio",
        "floor",
        "ours/floor",
        "ours, local",
        "local ratio",
        "target",
        "met",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        unit = f" ({r['unit']})" if r["unit"] else ""
        met = {True: "yes", False: "**NO**", None: "—"}[r["ok"]]
        note = f" — {r['note']}" if r.get("note") else ""
        cells = [
            f"{r['metric']}{unit}",
            _fmt(r["ours"]),
            _fmt(r["official"]),
            _x(r["ratio"]),
            _fmt(r.get("floor")),
            _x(r.get("of_floor"), 2),
            _fmt(r.get("local")),
            _x(r.get("local_ratio")),
            r["target"] + note,
            met,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
    }


def report(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n## {title}\n")
    print(table(rows))
    sys.stdout.flush()


def errors(**sides: dict[str, Any]) -> list[str]:
    """A note for every side whose child failed: ``side: error`` (names as given, ``_`` read as a space)."""
    return [f"{name.replace('_', ' ')}: {r['error']}" for name, r in sides.items() if "error" in r]


def meets(
    r: dict[str, Any], official_x: float, floor_x: float | None = None, local_x: float | None = None
) -> bool | None:
    """Whether a row meets its ratio targets: hosted vs official (and vs the floor), local vs official.

    None while the hosted-vs-official ratio is missing (the official SDK was not measured); a missing floor
    or local figure is not held against the row.
    """
    if r["ratio"] is None:
        return None
    ok: bool = r["ratio"] >= official_x
    if floor_x is not None and r.get("of_floor") is not None:
        ok = ok and r["of_floor"] >= floor_x
    if local_x is not None and r.get("local_ratio") is not None:
        ok = ok and r["local_ratio"] >= local_x
    return ok


def best_of(runs: Sequence[dict[str, Any]], key: str, better: str = "higher") -> dict[str, Any]:
    """The run with the best ``key`` among interleaved runs of one side (a failed run only if all failed).

    Ours and its floor run as A B A B against the same server and each keeps its better run, so a burst of
    load from other work on the machine during one run does not decide the ours/floor ratio.
    """
    good = [r for r in runs if r.get(key) is not None]
    if not good:
        return runs[-1]
    pick = max if better == "higher" else min
    return pick(good, key=lambda r: r[key])
