"""The official ``hpcai`` 0.2.0 SDK's own environment: one builder for the tests and the benchmarks.

The two SDKs cannot share an interpreter as installed (hpcai pins ``numpy<2`` and its own pydantic/httpx), so
the official SDK lives in a virtual environment of its own, ``.official/venv`` (git-ignored), made on first
use exactly as a user installs it: ``pip install torch==2.13.0`` first (the CPU wheel; a looser pin pulls
gigabytes of CUDA packages), then ``hpcai==0.2.0``. Two pins are added so its cookbook works: hpcai pins
``numpy<2``; the newest ``pyarrow`` (26, which ``datasets`` pulls) refuses numpy 1, and ``datasets`` 5 needs
pyarrow >= 24, with which (24, 25) its dataset fingerprinting fails to pickle pyarrow's ``MonthDayNano``;
``datasets==4.4.1`` with ``pyarrow==23.0.0`` works (tried).
The SDK's ``examples/`` are in its sdist only (not its wheel): ``pip download --no-binary :all:`` puts it
in ``.official/sdist``.

``HPCAI_OFFICIAL_PYTHON=/path/to/python`` uses an existing interpreter that has hpcai instead of building.
A file lock makes parallel test processes (and the benchmarks) wait for one build instead of racing.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".official"
VENV = HOME / "venv"
SDIST = HOME / "sdist"
TORCH = "torch==2.13.0"
HPCAI = "hpcai==0.2.0"
# a datasets/pyarrow pair that works beside hpcai's numpy<2 (see the module docstring)
COOKBOOK_PINS = ("pyarrow==23.0.0", "datasets==4.4.1")
# every package of the venv at the version it resolved to once: pip's resolver then has nothing to search
CONSTRAINTS = Path(__file__).with_name("official-constraints.txt")
_STAMP = VENV / ".installed"
_LOG = HOME / "install.log"
_PROBE = (
    "import hpcai, hpcai.cookbook.renderers, datasets, chz, importlib.metadata as m; "
    "assert m.version('hpcai') == '0.2.0'"
)


class OfficialUnavailable(RuntimeError):
    """The official SDK's environment could not be made (the message says which step failed)."""


_failed: OfficialUnavailable | None = None


@contextmanager
def _locked() -> Iterator[None]:
    HOME.mkdir(exist_ok=True)
    with open(HOME / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _works(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", _PROBE], capture_output=True, check=False).returncode == 0
    except OSError:  # no such interpreter
        return False


def _run_steps(steps: list[list[str]]) -> None:
    log = ""
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        log += f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n"
        _LOG.write_text(log)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise OfficialUnavailable(f"`{' '.join(cmd[2:])}` failed: {tail[0]} (log: {_LOG})")


def _build() -> None:
    print(f"[official] creating {VENV} ({TORCH}, then {HPCAI}); log: {_LOG}", file=sys.stderr)
    venv_python = str(VENV / "bin" / "python")
    pip = [venv_python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run_steps(
        [
            [sys.executable, "-m", "venv", "--clear", str(VENV)],
            [*pip, TORCH],
            [*pip, HPCAI, *COOKBOOK_PINS, "-c", str(CONSTRAINTS)],
        ]
    )
    if not _works(venv_python):
        raise OfficialUnavailable(f"hpcai 0.2.0 does not import in the new venv {VENV}")
    _STAMP.write_text("ok\n")


@cache
def official_python() -> str:
    """Path of a python that has hpcai 0.2.0 and its cookbook's imports; builds ``.official/venv`` once."""
    override = os.environ.get("HPCAI_OFFICIAL_PYTHON")
    if override:
        if not _works(override):
            raise OfficialUnavailable(f"HPCAI_OFFICIAL_PYTHON={override}: no hpcai 0.2.0 (or datasets)")
        return override
    global _failed
    if _failed is not None:
        raise _failed  # one failed build per process, not one per test
    python = str(VENV / "bin" / "python")
    with _locked():
        if not (_STAMP.exists() and _works(python)):
            try:
                _build()
            except OfficialUnavailable as exc:
                _failed = exc
                raise
    return python


@cache
def official_site_packages() -> str:
    """The official environment's site-packages folder (where its ``hpcai`` package and cookbook live)."""
    code = "import hpcai, os; print(os.path.dirname(os.path.dirname(hpcai.__file__)))"
    out = subprocess.run([official_python(), "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@cache
def official_sdist() -> Path:
    """The official SDK's unpacked sdist (it alone has ``examples/sft.py``), fetched with pip once."""
    unpacked = SDIST / "hpcai-0.2.0"
    with _locked():
        if not (unpacked / "examples" / "sft.py").exists():
            SDIST.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps"]
            _run_steps([[*cmd, "-d", str(SDIST), HPCAI]])
            with tarfile.open(SDIST / "hpcai-0.2.0.tar.gz") as archive:
                archive.extractall(SDIST, filter="data")
    return unpacked


def run_official(python: str, script: str, *args: str, timeout: float = 120.0) -> Any:
    """Run ``script`` under the official SDK's Python; return the JSON it printed on its last line."""
    done = subprocess.run(
        [python, "-c", script, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"the official SDK's script failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # `python -m tests.official_env`: build (or check) it before the tests run
    print(official_python(), official_sdist(), sep="\n")
