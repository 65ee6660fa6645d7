"""Import time of the package: ``import hpcai_async`` vs ``import hpcai``, each in a fresh interpreter.

Measured inside the child (perf_counter around the import statement, interpreter start-up excluded), median
of several runs after warm-up runs that fill the OS file cache. Also records whether torch / transformers
were imported as a side effect. Run: ``python -m bench.import_time``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bench import _official
from bench._common import ROOT, median, report, row

TARGET_S = 0.15

_PROBE = """
import sys, time, json
t0 = time.perf_counter()
import {pkg}
dt = time.perf_counter() - t0
print(json.dumps({{"s": dt, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "modules": len(sys.modules)}}))
"""


def measure(python: str, pkg: str, *, repeat: int = 7, warmup: int = 2) -> dict[str, Any]:
    runs = []
    for i in range(warmup + repeat):
        proc = subprocess.run(
            [python, "-c", _PROBE.format(pkg=pkg)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HPCAI_TELEMETRY": "0"},
        )
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:] or ["import failed"]}
        if i >= warmup:
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "s": median(r["s"] for r in runs),
        "torch": runs[-1]["torch"],
        "transformers": runs[-1]["transformers"],
        "modules": runs[-1]["modules"],
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    repeat = 3 if quick else 7
    ours = measure(sys.executable, "hpcai_async", repeat=repeat)
    py, reason = _official.python()
    official = measure(py, "hpcai", repeat=repeat) if py else {"error": reason}
    o = ours.get("s")
    notes = []
    if "error" in ours:
        notes.append(f"ours failed: {ours['error']}")
    else:
        heavy = [m for m in ("torch", "transformers") if ours[m]]
        notes.append(
            f"ours loads {ours['modules']} modules" + (f", imports {'+'.join(heavy)}" if heavy else "")
        )
    if "error" in official:
        notes.append(f"official: {official['error']}")
    else:
        notes.append(f"official imports torch: {official['torch']}")
    ok = None if o is None else (o <= TARGET_S and not ours["torch"] and not ours["transformers"])
    return [
        row(
            "import time",
            "ms",
            None if o is None else o * 1e3,
            official.get("s", 0) * 1e3 if "s" in official else None,
            "≤ 150 ms, no torch/transformers",
            ok,
            note="; ".join(notes),
        )
    ]


if __name__ == "__main__":
    report("import time", run())
