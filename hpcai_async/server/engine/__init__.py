"""The PyTorch engine: forward/backward, AdamW, checkpoints and batched sampling, LoRA on shared base models
and full-parameter runs on copies of their own.

``Engine`` (in ``facade``) is the one class the server sees; it implements ``engine_api.EngineAPI`` with:

- ``adapters``: base models, the runs' PEFT adapters (inject / activate / delete) and the sampler cache;
- ``full``: full-parameter runs (a copy of the base model each) and the cache of full-weight samplers;
- ``losses``: the loss registry (one function per loss, with its required inputs);
- ``training``: the forward/backward pass, the AdamW step and the guard against non-finite state;
- ``sampling``: rows, prefill, decode steps and stop checks;
- ``checkpoint``: the checkpoint folder's files, written and read.

Every input rule is in ``engine_api``. ``Engine`` loads lazily from here so that ``engine_api`` can read the
loss registry without importing the facade (which imports ``engine_api``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = (
    "ATTN_MODULES",
    "DEFAULT_MAX_TOKENS",
    "MAX_NUM_SAMPLES",
    "MLP_MODULES",
    "UNEMBED_MODULES",
    "Engine",
)

if TYPE_CHECKING:
    from ..engine_api import MAX_NUM_SAMPLES
    from .adapters import ATTN_MODULES, MLP_MODULES, UNEMBED_MODULES
    from .facade import Engine
    from .sampling import DEFAULT_MAX_TOKENS

_WHERE = {
    "Engine": ".facade",
    "DEFAULT_MAX_TOKENS": ".sampling",
    "MAX_NUM_SAMPLES": "..engine_api",
    "ATTN_MODULES": ".adapters",
    "MLP_MODULES": ".adapters",
    "UNEMBED_MODULES": ".adapters",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where, __name__), name)
