"""The upstream ``tinker`` SDK's side of the codec row: its own venv, made by the bench as a user installs it.

``tinker`` 0.38 (the newest on the registry when this was written) encodes forward_backward requests and
decodes ForwardBackwardOutput as protobuf (``tinker/proto/request_conv.py``, ``response_conv.py``). It does
not need torch, so the venv is ``pip install tinker==0.38.0`` and nothing else (about 25 packages, ~20 s
from the wheel cache), in ``bench/.venv-tinker`` (git-ignored; log in ``install.log`` there).
``BENCH_TINKER_PYTHON=/path/to/python`` uses an existing interpreter that has tinker 0.38 instead. If it
cannot be made, the codec rows say so and the other numbers are unaffected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from bench._common import ROOT, run_child

VENV = ROOT / "bench" / ".venv-tinker"
VERSION = "0.38.0"
_STAMP = VENV / ".installed"
_LOG = VENV / "install.log"
_cached: tuple[str | None, str] | None = None


def _venv_python() -> str:
    return str(VENV / "bin" / "python")


def _works(python: str) -> bool:
    probe = (
        "import tinker.proto.request_conv, importlib.metadata as m; "
        f"assert m.version('tinker') == '{VERSION}'"
    )
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0
    except OSError:
        return False


def _create() -> str | None:
    """Make the venv; None on success, else a one-line reason."""
    print(f"[bench] creating {VENV.relative_to(ROOT)} (tinker=={VERSION}); log: {_LOG}", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [_venv_python(), "-m", "pip", "install", "-q", f"tinker=={VERSION}"],
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
        return f"tinker {VERSION} does not import in the new venv"
    _STAMP.write_text("ok\n")
    return None


def python() -> tuple[str | None, str]:
    """(path of a python that has tinker 0.38, or None; why not)."""
    global _cached
    if _cached is not None:
        return _cached
    override = os.environ.get("BENCH_TINKER_PYTHON")
    if override:
        _cached = (
            (override, "") if _works(override) else (None, f"BENCH_TINKER_PYTHON={override} has no tinker")
        )
    elif _STAMP.exists() and _works(_venv_python()):
        _cached = (_venv_python(), "")
    else:
        reason = _create()
        _cached = (None, f"tinker {VERSION} unavailable: {reason}") if reason else (_venv_python(), "")
    return _cached


def resolved() -> tuple[str | None, str] | None:
    """What ``python()`` found, if a bench asked for it in this process (never builds the venv)."""
    return _cached


def run(module: str, func: str, cfg: dict[str, Any] | None = None, *, timeout: float = 600) -> dict[str, Any]:
    """``bench.<module>.<func>(**cfg)`` in the tinker venv; ``{"error": ...}`` if that venv is missing."""
    py, reason = python()
    if py is None:
        return {"error": reason}
    return run_child(py, module, func, cfg, env={"TINKER_TELEMETRY": "0"}, timeout=timeout)
