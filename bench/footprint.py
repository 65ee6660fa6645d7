"""Installed footprint: distributions and disk of a fresh venv holding only the client (core dependencies).

Ours: a throwaway venv made here with ``pip install .`` (a copy of pyproject.toml, README.md and
hpcai_async/). Official: its bench venv (``pip install torch==2.13.0`` then ``pip install hpcai==0.2.0``,
see ``_official``). Counted in each venv by its own python: every installed distribution except the venv's
tools (pip, setuptools, wheel), and the disk its files take (du-style: allocated blocks of every file its
RECORD lists). Run: ``python -m bench.footprint``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import _official
from bench._common import ROOT, report, row

TARGET_DISTS = 30
TARGET_MB = 200
TOOLS = {"pip", "setuptools", "wheel"}

_COUNT = """
import importlib.metadata as md, json, os, sys
tools = set(sys.argv[1].split(","))
sizes = {}
for dist in md.distributions():
    name = dist.metadata["Name"].lower().replace("_", "-")
    if name in tools or name in sizes:
        continue
    sizes[name] = 0
    for f in dist.files or ():
        try:
            sizes[name] += os.stat(dist.locate_file(f)).st_blocks * 512
        except OSError:
            pass
print(json.dumps({"dists": len(sizes), "bytes": sum(sizes.values()), "names": sorted(sizes),
                  "sizes": sizes, "torch": "torch" in sizes}))
"""


def count(python: str) -> dict[str, Any]:
    proc = subprocess.run(
        [python, "-c", _COUNT, ",".join(sorted(TOOLS))], capture_output=True, text=True, check=False, cwd="/"
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def ours() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hpcai-async-footprint-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, src / name)
        shutil.copytree(
            ROOT / "hpcai_async", src / "hpcai_async", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        venv = Path(tmp) / "venv"
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                return {"error": f"{' '.join(cmd[2:5])}: {tail[0]}"}
        return count(str(venv / "bin" / "python"))


def run(quick: bool = False) -> list[dict[str, Any]]:
    o = ours()
    py, reason = _official.python()
    f = count(py) if py else {"error": reason}
    notes = []
    for side, r in (("ours", o), ("official", f)):
        if "error" in r:
            notes.append(f"{side}: {r['error']}")
    if "sizes" in o:
        big = sorted(o["sizes"].items(), key=lambda kv: -kv[1])[:6]
        notes.append("ours, largest: " + ", ".join(f"{n} {b / 2**20:.0f} MB" for n, b in big))
        notes.append("all: " + ", ".join(o["names"]))

    def mb(r):
        return r["bytes"] / 2**20 if "bytes" in r else None

    return [
        row(
            "installed distributions",
            "count",
            o.get("dists"),
            f.get("dists"),
            f"≤ {TARGET_DISTS}, no torch",
            None if "dists" not in o else (o["dists"] <= TARGET_DISTS and not o["torch"]),
        ),
        row(
            "installed size",
            "MB",
            mb(o),
            mb(f),
            f"≤ {TARGET_MB} MB",
            None if "bytes" not in o else mb(o) <= TARGET_MB,
            note="; ".join(notes),
        ),
    ]


if __name__ == "__main__":
    report("installed footprint", run())
