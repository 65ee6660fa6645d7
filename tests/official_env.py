"""Where the official hpcai 0.2.0 SDK is installed, for the tests that compare us with it.

``official_python()`` is the one place the tests ask. For now it is ``$HPCAI_OFFICIAL_PYTHON``, the
benchmark's venv (``bench/.venv-official``, made by ``python -m bench``) or the machine's prepared one; the
cached venv builder that CI uses takes this function over.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = ("official_python", "run_official")

_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "bench" / ".venv-official" / "bin" / "python",
    Path("/work/ref/venv-official/bin/python"),
)


def official_python() -> str | None:
    """The path of a Python that can ``import hpcai`` (the official SDK), or None where there is none."""
    configured = os.environ.get("HPCAI_OFFICIAL_PYTHON")
    if configured:
        return configured
    return next((str(p) for p in _CANDIDATES if p.is_file()), None)


def run_official(python: str, script: str, *args: str, timeout: float = 120.0) -> Any:
    """Run ``script`` under the official SDK's Python; return the JSON it printed on its last line."""
    done = subprocess.run(
        [python, "-c", script, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"the official SDK's script failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
