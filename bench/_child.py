"""Child-process entry: ``python -m bench._child MODULE FUNC JSON`` emits ``bench.MODULE.FUNC(**JSON)``.

Every measurement runs in a fresh interpreter (ours in this venv, the official SDK's in its own venv), so
import caches, peak RSS and event loops of one measurement never leak into another.
"""

from __future__ import annotations

import importlib
import json
import sys

from bench._common import emit


def main() -> None:
    module, func, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    mod = importlib.import_module(f"bench.{module}")
    emit(getattr(mod, func)(**cfg))


if __name__ == "__main__":
    main()
