"""The import alias: ``hpcai`` and every ``hpcai.*`` module resolve to the same module of ``hpcai_async``.

A meta-path finder placed first on ``sys.meta_path`` answers for the name ``hpcai`` and every name under it;
its loader imports the ``hpcai_async`` module of the same path and puts *that object* in ``sys.modules``
under the alias too, so ``hpcai.types.tensor_data.TensorData is hpcai_async.types.TensorData`` and there is
one copy of every class (isinstance checks, registries and pickles agree whichever name a module used).
``hpcai.cookbook`` goes to ``hpcai_async.cookbook``, which loads the official package's cookbook files.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

ALIAS = "hpcai"
TARGET = "hpcai_async"


def target_name(fullname: str) -> str | None:
    """``hpcai.types.tensor_data`` -> ``hpcai_async.types.tensor_data``; None for names outside ``hpcai``."""
    if fullname == ALIAS or fullname.startswith(ALIAS + "."):
        return TARGET + fullname[len(ALIAS) :]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self._target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a placeholder; exec_module swaps the real module in

    def exec_module(self, module: ModuleType) -> None:
        # importlib returns whatever sys.modules holds under the name once this returns, so the alias *is* the
        # real module; its __name__/__spec__ stay hpcai_async's (importing it first keeps them untouched)
        sys.modules[module.__name__] = importlib.import_module(self._target)


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``hpcai.*`` names as aliases of ``hpcai_async.*`` (the official package is never imported)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        real = target_name(fullname)
        if real is None:
            return None
        try:
            found = importlib.util.find_spec(real) is not None
        except ValueError:  # a module made at run time, without a spec (hpcai_async.types._paths makes them)
            found = real in sys.modules
        if not found:
            return None  # not ours either: the usual ModuleNotFoundError names the hpcai module asked for
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real))


def install() -> None:
    """Put the alias first on ``sys.meta_path`` (idempotent); an ``hpcai`` imported before it is replaced."""
    if not any(isinstance(finder, AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())
    for name in [n for n in sys.modules if target_name(n) is not None]:
        module = sys.modules[name]
        if not module.__name__.startswith(TARGET):
            del sys.modules[name]  # the official package, imported before the alias: drop it, ours answers


def installed() -> bool:
    return any(isinstance(finder, AliasFinder) for finder in sys.meta_path)
