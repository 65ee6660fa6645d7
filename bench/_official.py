"""The official ``hpcai`` 0.2.0 SDK's side: its own venv, and running its measurements in that venv's python.

The two SDKs cannot share an interpreter (hpcai pins pydantic/httpx and imports torch), so every official
measurement runs as ``.official/venv/bin/python -m bench._child MODULE FUNC JSON``. The venv is the tests'
one, made on first use by ``tests/official_env.py`` (one builder, one folder, a lock against two builds):
``pip install torch==2.13.0`` (the CPU wheel), then ``hpcai==0.2.0`` as a user would install the SDK.
``BENCH_OFFICIAL_PYTHON=/path/to/python`` (or the tests' ``HPCAI_OFFICIAL_PYTHON``) uses an existing
interpreter that has hpcai instead. If the venv cannot be made, the benches still measure ours and say what
is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from bench._common import run_child
from tests import official_env

VENV = official_env.VENV

_cached: tuple[str | None, str] | None = None


def _works(python: str) -> bool:
    probe = "import hpcai, importlib.metadata as m; assert m.version('hpcai') == '0.2.0'"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0
    except OSError:  # no such interpreter
        return False


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
        return _cached
    try:
        _cached = (official_env.official_python(), "")
    except official_env.OfficialUnavailable as exc:
        _cached = (None, f"official SDK unavailable: {exc}")
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
