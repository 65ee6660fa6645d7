"""Base models for the engine: the built-in tiny model and local Hugging Face models, loaded offline.

A model spec is one of

- ``"hpcai-async/tiny-qwen3"``: the built-in model shipped in ``builtin/`` (weights, config, tokenizer), built
  by ``scripts/build_builtin.py``;
- a path to a folder holding ``config.json`` (and weights, and a tokenizer): listed under the folder's name;
- a Hugging Face repo id already in the local cache (``Qwen/Qwen3-0.6B``): listed under the id as given;
- ``ALIAS=SPEC``: the model of ``SPEC``, listed under ``ALIAS`` (``Qwen/Qwen3-0.6B=hpcai-async/tiny-qwen3``
  serves the built-in model under a name that programs written for the hosted service recognise).

Nothing is ever downloaded: every load passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

BUILTIN_NAME = "hpcai-async/tiny-qwen3"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

__all__ = ("BUILTIN_DIR", "BUILTIN_NAME", "LoadedModel", "ModelSpec", "load_model", "resolve_model")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Where a base model lives: its listed ``name``, its folder, and the facts read from ``config.json``."""

    name: str
    path: Path
    arch: str
    vocab_size: int
    max_context: int


@dataclass(slots=True)
class LoadedModel:
    """A loaded base model: the torch module (frozen, eval mode) and what the engine needs to know."""

    spec: ModelSpec
    module: Any  # transformers PreTrainedModel
    eos_token_ids: frozenset[int]
    pad_token_id: int
    device: Any  # torch.device
    dtype: Any  # torch.dtype


def resolve_model(spec: str) -> ModelSpec:
    """The ModelSpec for ``spec`` (see the module docstring); ValueError if it is not found locally."""
    alias, sep, target = spec.partition("=")
    if sep and not Path(spec).expanduser().exists():
        if not alias or not target:
            raise ValueError(f"model alias {spec[:200]!r} must be ALIAS=NAME_OR_DIR")
        return replace(resolve_model(target), name=alias)
    if spec == BUILTIN_NAME:
        return _spec_from_folder(BUILTIN_NAME, BUILTIN_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {spec!r} has no config.json")
        return _spec_from_folder(path.resolve().name, path.resolve())
    if path.exists():
        raise ValueError(f"model {spec!r} is a file; give a folder holding config.json")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, local_files_only=True)
    except Exception as exc:  # any hub error means: not in the local cache
        raise ValueError(
            f"model {spec!r} is neither a folder with config.json nor a repo id in the local Hugging Face "
            f"cache ({type(exc).__name__}); download it first or pass its folder"
        ) from None
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"cached model {spec!r} has no config.json")
    return _spec_from_folder(spec, Path(folder))


def _spec_from_folder(name: str, folder: Path) -> ModelSpec:
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    archs = config.get("architectures") or [""]
    vocab = text.get("vocab_size")
    if not isinstance(vocab, int):
        raise ValueError(f"model {name!r}: config.json has no vocab_size")
    context = text.get("max_position_embeddings") or text.get("n_positions") or 2048
    return ModelSpec(name=name, path=folder, arch=str(archs[0]), vocab_size=vocab, max_context=int(context))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation chatter of transformers/peft (tests turn warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_model(spec: ModelSpec, device: str) -> LoadedModel:
    """Load ``spec`` frozen, in eval mode, on ``device`` (float32 on CPU; bf16 on CUDA for 16-bit models)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    dtype = torch.float32
    if device.startswith("cuda"):
        config = json.loads((spec.path / "config.json").read_text())
        if str(config.get("torch_dtype") or config.get("dtype")) in ("bfloat16", "float16"):
            dtype = torch.bfloat16
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet():
            module = AutoModelForCausalLM.from_pretrained(str(spec.path), local_files_only=True, dtype=dtype)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    module.to(device)
    module.eval()
    module.requires_grad_(False)
    eos: set[int] = set()
    for source in (module.config, getattr(module, "generation_config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list | tuple):
            eos.update(int(v) for v in value)
    pad = getattr(module.config, "pad_token_id", None)
    if not isinstance(pad, int):
        pad = min(eos) if eos else 0
    return LoadedModel(
        spec=spec,
        module=module,
        eos_token_ids=frozenset(eos),
        pad_token_id=pad,
        device=torch.device(device),
        dtype=dtype,
    )
