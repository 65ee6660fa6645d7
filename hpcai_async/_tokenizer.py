"""Tokenizers: the Hugging Face tokenizer of a served model name, loaded without the server package.

A model built into the package ships its tokenizer files in ``hpcai_async/server/builtin``; they are found
by path, never by importing ``hpcai_async.server`` (the client must not pull in the server's aiohttp app).
The official client's naming rules map other names to a Hugging Face repository (PROTOCOL.md §8.4).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ("BUILTIN_NAME", "builtin_dir", "load_tokenizer", "tokenizer_id")

# The built-in model (the same name as hpcai_async.server.models.BUILTIN_NAME, which a test pins).
BUILTIN_NAME = "hpcai-async/tiny-qwen3"
_BUILTIN_DIR = Path(__file__).resolve().parent / "server" / "builtin"


def tokenizer_id(model_name: str) -> str:
    """The Hugging Face tokenizer for a served model name (the official client's rules, PROTOCOL.md §8.4)."""
    if model_name.startswith("meta-llama/Llama-3"):
        return "baseten/Meta-Llama-3-tokenizer"  # the ungated copy
    if model_name.count("/") == 2:
        org, model, _variant = model_name.split("/")
        return f"{org}/{model}"
    return model_name


def builtin_dir(model_name: str) -> Path | None:
    """The folder holding the tokenizer of a model built into the package, or None for other names."""
    if model_name != BUILTIN_NAME:
        return None
    return _BUILTIN_DIR if (_BUILTIN_DIR / "tokenizer.json").is_file() else None


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_name``: shipped with a built-in model, in a local folder, or from the Hub."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigurationError(
            "get_tokenizer needs the transformers package: pip install 'hpcai_async[transformers]'"
        )
    local = builtin_dir(model_name) or (Path(model_name) if os.path.isdir(model_name) else None)
    if local is not None and (local / "tokenizer.json").is_file():
        # the fast tokenizer class alone: unlike AutoTokenizer it does not import torch
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(local))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(local) if local else tokenizer_id(model_name), use_fast=True)
