"""Running programs written for the official ``hpcai`` SDK, unchanged, on hpcai_async.

    python -m hpcai_async.compat train.py --lr 1e-4                  # as `python train.py --lr 1e-4` would
    python -m hpcai_async.compat -m hpcai.cookbook.recipes.sl_loop model_name=Qwen/Qwen3-0.6B

    import hpcai_async.compat; hpcai_async.compat.install()          # a notebook: before `import hpcai`
    import hpcai                                                     # ... is hpcai_async from here on

Under it ``import hpcai`` and every ``hpcai.*`` module are the hpcai_async modules of the same path
(``hpcai.types.tensor_data`` is ``hpcai_async.types.tensor_data``); ``hpcai.cookbook`` is the official
package's recipe library (when it is installed), run on this client: see ``hpcai_async.cookbook``.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

from ._alias import install, installed, target_name

__all__ = ("install", "installed", "main", "run")

_USAGE = "usage: python -m hpcai_async.compat (SCRIPT | -m MODULE) [ARGS ...]"


def run(argv: Sequence[str]) -> None:
    """Run ``SCRIPT ARGS...`` or ``-m MODULE ARGS...`` as ``__main__`` with the alias installed."""
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        raise SystemExit(_USAGE)
    install()
    if argv[0] == "-m":
        module = target_name(argv[1]) or argv[1]  # runpy needs the real module, not its alias
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in argv[0]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    sys.argv = [script, *argv[1:]]
    # as `python SCRIPT` does: the script's folder first on the path, in place of -m's current folder
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


def main() -> None:
    run(sys.argv[1:])
