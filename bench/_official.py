"""The official ``hpcai`` 0.2.0 SDK's side: its own venv, and running its measurements in that venv's python.

The two SDKs cannot share an interpreter (hpcai pins pydantic/httpx and imports torch), so every official
measurement runs as ``bench/.venv-official/bin/python -m bench._child MODULE FUNC JSON``. The venv is made
on first use, exactly as a user would install the SDK: ``pip install torch==2.13.0`` (the CPU wheel; a
looser pin pulls gigabytes of CUDA packages), then ``pip install hpcai==0.2.0``.
``BENCH_OFFICIAL_PYTHON=/path/to/python`` uses an existing interpreter that has hpcai instead. If the venv
cannot be made, the benches still measure ours and say what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from bench._common import ROOT, run_child

VENV = ROOT / "bench" / ".venv-official"
TORCH = "torch==2.13.0"
HPCAI = "hpcai==0.2.0"
_STAMP = VENV / ".installed"
_LOG = VENV / "install.log"

_cached: tuple[str | None, str] | None = None


def _venv_python() -> str:
    return str(VENV / "bin" / "python")


def _works(python: str) -> bool:
    probe = "import hpcai, importlib.metadata as m; assert m.version('hpcai') == '0.2.0'"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0
    except OSError:  # no such interpreter
        return False


def _create() -> str | None:
    """Make the venv; return None on success or a one-line reason."""
    print(f"[bench] creating {VENV.relative_to(ROOT)} ({TORCH}, then {HPCAI}); log: {_LOG}", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [_venv_python(), "-m", "pip", "install", "-q", TORCH],
        [_venv_python(), "-m", "pip", "install", "-q", HPCAI],
    ]
    log = ""
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        log += f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n"
        if VENV.exists():
            _LOG.write_text(log)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return f"`{' '.join(cmd[2:])}` failed: {tail[0]}"
    if not _works(_venv_python()):
        return "hpcai 0.2.0 does not import in the new venv"
    _STAMP.write_text("ok\n")
    return None


def python() -> tuple[str | None, str]:
    """(path of a python that has hpcai 0.2.0, or None; why not)."""
    global _cached
    if _cached is not None:
        return _cached
    override = os.environ.get("BENCH_OFFICIAL_PYTHON")
    if override:
        _cached = (
            (override, "") if _works(override) else (None, f"BENCH_OFFICIAL_PYTHON={override} has no hpcai")
        )
    elif _STAMP.exists() and _works(_venv_python()):
        _cached = (_venv_python(), "")
    else:
        reason = _create()
        _cached = (None, f"official SDK unavailable: {reason}") if reason else (_venv_python(), "")
    return _cached


def run(
    module: str,
    func: str,
    cfg: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """``bench.<module>.<func>(**cfg)`` in the official venv; ``{"error": ...}`` if that venv is missing."""
    py, reason = python()
    if py is None:
        return {"error": reason}
    base = {"HPCAI_TELEMETRY": "0"}
    return run_child(py, module, func, cfg, env={**base, **(env or {})}, timeout=timeout)


def run_ours(
    module: str,
    func: str,
    cfg: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """``bench.<module>.<func>(**cfg)`` in a fresh interpreter of this (hpcai_async's) venv.

    Plain asyncio unless ``BENCH_UVLOOP=1`` (``python -m bench --uvloop``): uvloop is an optional extra.
    """
    uv = os.environ.get("BENCH_UVLOOP", "") == "1"
    base = {"HPCAI_ASYNC_NO_UVLOOP": "0" if uv else "1"}
    return run_child(sys.executable, module, func, cfg, env={**base, **(env or {})}, timeout=timeout)
