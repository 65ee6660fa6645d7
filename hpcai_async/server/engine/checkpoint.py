"""The checkpoint file format: what a saved folder holds, how it is written, read and checked.

A LoRA checkpoint is a folder with ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's layout,
loadable with ``PeftModel.from_pretrained``); a full-parameter one (format ``FULL_FORMAT``) holds
``model.safetensors`` (every parameter, by its name in the model) + the base model's ``config.json``
(loadable with ``AutoModelForCausalLM.from_pretrained``). Both have ``engine.json`` (format, its
``checkpoint_type``, base model, LoRA config or null, steps) and, for training checkpoints,
``optimizer.safetensors`` (``<param>.exp_avg`` / ``<param>.exp_avg_sq``; the step is in engine.json). Every
reader checks the whole folder before the caller changes anything.

``checkpoint_type`` says how the weights serve: ``"delta"`` (a LoRA adapter on the shared base model) or
``"base"`` (full weights, a model of their own: a full-parameter run's, or a LoRA run's adapter merged into
the base weights); the sampler loads a folder by it. Folders written before it was recorded have their
format's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ... import types
from ..._errors import BadRequestError

__all__ = (
    "ADAPTER_FILE",
    "CHECKPOINT_FORMAT",
    "ENGINE_FILE",
    "FULL_FILE",
    "FULL_FORMAT",
    "OPTIMIZER_FILE",
    "check_finite",
    "check_layout",
    "read_checkpoint",
    "read_meta",
    "read_optimizer",
    "weights_type",
    "write_checkpoint",
)

CHECKPOINT_FORMAT: Final = "hpcai-async-lora/1"
FULL_FORMAT: Final = "hpcai-async-full/1"
ADAPTER_FILE: Final = "adapter_model.safetensors"
FULL_FILE: Final = "model.safetensors"
_WEIGHTS: Final = {CHECKPOINT_FORMAT: ADAPTER_FILE, FULL_FORMAT: FULL_FILE}  # format -> weights file
_TYPES: Final = {CHECKPOINT_FORMAT: "delta", FULL_FORMAT: "base"}  # format -> its checkpoint_type
OPTIMIZER_FILE: Final = "optimizer.safetensors"
ENGINE_FILE: Final = "engine.json"
PEFT_CONFIG_FILE: Final = "adapter_config.json"


def _bad(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_request")


def check_layout(what: str, tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> None:
    """The layout rule: exactly the expected keys (adapter or model parameters), each with its shape."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise _bad(f"{what} do not match the model's layout ({detail})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise _bad(f"{what}: {key} has shape {list(tensors[key].shape)}, expected {list(shape)}")


def check_finite(what: str, tensors: Mapping[str, Any]) -> None:
    """Loaded tensors hold no NaN or infinity (a run never saves them: the file was damaged or edited)."""
    import torch

    values = list(tensors.values())
    if values and not bool(torch.stack(torch._foreach_norm(values, math.inf)).isfinite().all()):
        raise _bad(f"{what} hold NaN or infinite values; the checkpoint is damaged")


def read_meta(directory: Path, base_model: str | None = None) -> dict[str, Any]:
    """engine.json of a checkpoint folder (for ``base_model``, when given); no tensor is read."""
    path = directory / ENGINE_FILE
    if not path.is_file() or not any((directory / f).is_file() for f in _WEIGHTS.values()):
        raise _bad(f"{directory} is not a checkpoint of this server (no {ENGINE_FILE} / {ADAPTER_FILE})")
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _bad(f"cannot read {path}: {exc}") from None
    weights = _WEIGHTS.get(str(meta.get("format")))
    if weights is None:
        raise _bad(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    if not (directory / weights).is_file():
        raise _bad(f"{directory} is not a complete checkpoint (no {weights})")
    natural = _TYPES[meta["format"]]
    if meta.setdefault("checkpoint_type", natural) != natural:
        raise _bad(
            f"{path}: checkpoint_type {meta['checkpoint_type']!r} does not match its format "
            f"{meta['format']!r} ({natural!r}); the checkpoint is damaged"
        )
    if base_model is not None and meta.get("base_model") != base_model:
        raise _bad(
            f"weights at {directory} are for base model {meta.get('base_model')!r}, not {base_model!r}"
        )
    return meta


def weights_type(directory: Path) -> str:
    """The ``checkpoint_type`` of a checkpoint folder: ``"base"`` (full weights) or ``"delta"`` (adapter)."""
    return str(read_meta(directory)["checkpoint_type"])


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine.json, weight tensors: the adapter's or the full model's) of a checkpoint folder."""
    meta = read_meta(directory)
    return meta, _load_safetensors(directory / _WEIGHTS[meta["format"]])


def read_optimizer(
    directory: Path, meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, Any], int]:
    """(AdamW moments by ``<param>.exp_avg`` / ``.exp_avg_sq``, step) of a training checkpoint, checked
    against the parameter ``shapes``; empty moments when it was saved before the first optim_step."""
    opt_meta = meta.get("optimizer")
    path = directory / OPTIMIZER_FILE
    if not isinstance(opt_meta, dict) or not path.is_file():
        raise _bad(
            "this checkpoint holds no optimizer state (a sampler checkpoint?); load it without "
            "the optimizer, or save with save_state to keep the optimizer"
        )
    tensors = _load_safetensors(path)
    step = int(opt_meta.get("step") or 0)
    if tensors:
        expected = {}
        for key, shape in shapes.items():
            expected[f"{key}.exp_avg"] = shape
            expected[f"{key}.exp_avg_sq"] = shape
        check_layout("checkpoint optimizer state", tensors, expected)
        check_finite("checkpoint optimizer state", tensors)
        if step < 1:
            raise _bad("the checkpoint's optimizer state has no step count; it is damaged")
    return tensors, step


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        tensors: dict[str, Any] = load_file(str(path))
    except Exception as exc:
        raise _bad(f"cannot read {path.name}: {exc}") from None
    return tensors


def write_checkpoint(
    out: Path,
    *,
    base_model: str,
    arch: str,
    lora: types.LoraConfig | None,
    targets: tuple[str, ...],
    steps: int,
    weights: Mapping[str, Any],
    optimizer: tuple[Mapping[str, Any], int] | None,
    config: Path | None = None,
) -> None:
    """Write a checkpoint folder: CPU float32 ``weights`` (by PEFT key for a LoRA run, by parameter name for a
    full-parameter one, ``lora`` None, whose base model's ``config`` is copied too) and (moments, step) when
    training."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(weights), str(out / (ADAPTER_FILE if lora else FULL_FILE)), metadata={"format": "pt"})
    opt_meta: dict[str, Any] | None = None
    if optimizer is not None:
        moments, step = optimizer
        save_file(dict(moments), str(out / OPTIMIZER_FILE), metadata={"format": "pt"})
        opt_meta = {"type": "adamw", "step": step}
    fmt = CHECKPOINT_FORMAT if lora else FULL_FORMAT
    meta = {
        "format": fmt,
        "checkpoint_type": _TYPES[fmt],
        "base_model": base_model,
        "arch": arch,
        "lora": _lora_meta(lora) if lora else None,
        "target_modules": list(targets),
        "steps": steps,
        "optimizer": opt_meta,
    }
    (out / ENGINE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if lora:
        peft = _peft_config(base_model, lora.rank, targets)
        (out / PEFT_CONFIG_FILE).write_text(json.dumps(peft, indent=2) + "\n")
    elif config is not None and config.is_file():
        (out / "config.json").write_bytes(config.read_bytes())


def _lora_meta(lora: types.LoraConfig) -> dict[str, Any]:
    return {
        "rank": lora.rank,
        "alpha": lora.rank,
        "seed": lora.seed,
        "train_attn": lora.train_attn,
        "train_mlp": lora.train_mlp,
        "train_unembed": lora.train_unembed,
    }


def _peft_config(base_model: str, rank: int, targets: tuple[str, ...]) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it, for ``PeftModel.from_pretrained(base, folder)``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
