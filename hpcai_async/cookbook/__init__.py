"""The official SDK's recipe library, ``hpcai.cookbook``, loaded from the installed official package.

    from hpcai_async.cookbook.recipes import sl_loop        # the official recipe's code ...
    from hpcai_async.cookbook.rl import train               # ... with hpcai_async as its client

hpcai_async ships no copy of the cookbook: this package's search path is the installed official package's
``hpcai/cookbook`` folder, so its files are imported from there as ``hpcai_async.cookbook.*``. Their own
``import hpcai`` lines must mean this client, so importing this package installs the ``hpcai`` alias
(``hpcai_async.compat``) for the whole process. The official package itself is never imported.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

from hpcai_async.compat import install as _install_alias

_HINT = (
    "hpcai_async.cookbook runs the official SDK's recipe library, which is not installed here: "
    "`pip install hpcai==0.2.0` beside hpcai_async (hpcai_async stays the client that runs it)"
)


def _official_cookbook() -> Path:
    # PathFinder looks on sys.path only, past the alias on sys.meta_path that would answer with ourselves
    spec = importlib.machinery.PathFinder.find_spec("hpcai")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "cookbook" / "__init__.py").is_file():
            return Path(location) / "cookbook"
    raise ImportError(_HINT, name=__name__)


_ROOT = _official_cookbook()
__path__ = [str(_ROOT)]  # the submodules are the official files
_install_alias()
# the official package's own __init__ (license header today), run as this package's
exec(compile((_ROOT / "__init__.py").read_text(), str(_ROOT / "__init__.py"), "exec"))
