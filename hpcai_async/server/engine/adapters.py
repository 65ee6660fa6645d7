"""LoRA adapters on shared base models: the base model, the run, PEFT inject / activate / delete, the sampler
cache. (Full-parameter runs, which hold a copy of the base model of their own, are ``full``'s.)

One frozen base model is loaded per base name (lazily, on first use) and shared by every run on it. Each run
owns one PEFT LoRA adapter injected into that model (``peft.functional``: inject / set_adapter /
delete_adapter) and its own ``torch.optim.AdamW``. Sampling loads saved adapters under separate names (a small
LRU, ``SAMPLER_CACHE_SIZE``), so it never touches a training adapter's weights, gradients or optimizer.

LoRA conventions: ``lora_alpha = rank`` (scale 1), no dropout, A Kaiming-uniform (PEFT's default) and B zero,
so a new run computes exactly the base model. ``train_attn`` targets q/k/v/o_proj, ``train_mlp``
gate/up/down_proj, ``train_unembed`` lm_head. ``seed`` makes the initial A reproducible (torch.manual_seed
under fork_rng).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ... import types
from ..._errors import BadRequestError
from ..models import LoadedModel, ModelSpec, load_model, quiet
from . import checkpoint

__all__ = ("SAMPLER_CACHE_SIZE", "Base", "Run", "delete_adapter", "inject", "sampler_adapter", "targets")

ATTN_MODULES: Final = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: Final = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES: Final = ("lm_head",)
SAMPLER_CACHE_SIZE: Final = 4  # saved adapters kept loaded for sampling
_PEFT_PREFIX: Final = "base_model.model."  # key prefix PeftModel.save_pretrained uses


@dataclass(slots=True)
class Base:
    """A loaded base model and the adapters injected into it."""

    loaded: LoadedModel
    active: tuple[str, ...] | None = None  # adapters active now (None: unknown, set again before use)
    counter: int = 0
    samplers: OrderedDict[str, str] = field(default_factory=OrderedDict)  # LRU
    tokenizer: Any = None
    keep_logits: bool = False  # the model's forward takes logits_to_keep
    cache_arg: str = "past_key_values"  # the KV-cache argument ("cache" from transformers 5.x)
    tied: frozenset[str] = frozenset()  # parameter names sharing their tensor with another (tied weights)

    @classmethod
    def load(cls, spec: ModelSpec, device: str) -> Base:
        loaded = load_model(spec, device)
        args = inspect.signature(loaded.module.forward).parameters
        names: dict[int, list[str]] = {}
        for name, p in loaded.module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        return cls(
            loaded=loaded,
            keep_logits="logits_to_keep" in args,
            cache_arg="cache" if "cache" in args else "past_key_values",
            tied=frozenset(n for group in names.values() if len(group) > 1 for n in group),
        )

    @property
    def module(self) -> Any:
        return self.loaded.module

    def new_adapter_name(self, prefix: str) -> str:
        # internal names: PEFT forbids names that are substrings of "lora_" and dots (ModuleDict keys)
        self.counter += 1
        return f"{prefix}{self.counter}"

    def activate(self, adapters: tuple[str, ...], *, train: bool) -> None:
        if self.active == adapters:
            return
        from peft import functional as peft_fn

        with quiet():
            peft_fn.set_adapter(self.module, list(adapters), inference_mode=not train)
        self.active = adapters


@dataclass(slots=True)
class Run:
    """A run: its weights, its parameters and its optimizer. The weights are a LoRA ``adapter`` on the shared
    ``base``, or (full-parameter, ``adapter`` None) every weight of ``base``, a copy the run holds
    (``full``), or none (``frozen``: forward-only, on the shared base)."""

    run_id: str
    base: Base
    adapter: str | None
    lora: types.LoraConfig
    targets: tuple[str, ...]
    params: list[tuple[str, Any]]  # (checkpoint key, Parameter), in a fixed order
    frozen: bool = False
    optimizer: Any = None  # torch.optim.AdamW, created by the first optim_step
    steps: int = 0
    loss_sum: float = 0.0  # since the last optim_step, for recent_loss:mean
    weight_sum: float = 0.0
    loss_tokens: int = 0  # since the last optim_step, for grad_accumulation_normalization
    loss_sequences: int = 0

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self.params}


def targets(lora: types.LoraConfig) -> tuple[str, ...]:
    """The module names a LoRA config trains."""
    out: tuple[str, ...] = ()
    if lora.train_attn:
        out += ATTN_MODULES
    if lora.train_mlp:
        out += MLP_MODULES
    if lora.train_unembed:
        out += UNEMBED_MODULES
    return out


def inject(base: Base, prefix: str, rank: int, modules: tuple[str, ...], seed: int | None = None) -> str:
    """Inject a new adapter (A drawn under ``seed`` when given, B zero) and return its internal name."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import functional as peft_fn

    config = PeftLoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(modules), bias="none"
    )
    name = base.new_adapter_name(prefix)
    try:
        with torch.random.fork_rng(devices=[]), quiet():
            if seed is not None:
                torch.manual_seed(seed)
            peft_fn.inject_adapter_in_model(config, base.module, adapter_name=name)
    finally:
        base.active = None
    return name


def adapter_params(module: Any, adapter: str) -> list[tuple[str, Any]]:
    """(PEFT checkpoint key, parameter) of one adapter, in module order."""
    marker = f".{adapter}."
    out = []
    for name, p in module.named_parameters():
        if marker in name and (".lora_A." in name or ".lora_B." in name):
            out.append((_PEFT_PREFIX + name.replace(marker, "."), p))
    return out


def delete_adapter(base: Base, name: str) -> None:
    from peft import functional as peft_fn

    with quiet():
        peft_fn.delete_adapter(base.module, name, prefix="lora_")
    configs = getattr(base.module, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(name, None)
    base.active = None


def sampler_adapter(base: Base, directory: Path) -> str:
    """The internal name of the saved adapter in ``directory``, loaded if needed (an LRU of
    SAMPLER_CACHE_SIZE; a new save under the same name is loaded again)."""
    import torch

    try:
        stat = (directory / checkpoint.ADAPTER_FILE).stat()
    except OSError:
        raise BadRequestError(
            f"{directory} holds no {checkpoint.ADAPTER_FILE}: not a checkpoint of this server",
            code="invalid_request",
        ) from None
    key = f"{directory.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    name = base.samplers.get(key)
    if name is not None:
        base.samplers.move_to_end(key)
        return name
    meta, weights = checkpoint.read_checkpoint(directory)
    if meta.get("base_model") != base.loaded.spec.name:
        raise BadRequestError(
            f"the weights at {directory.name!r} are for base model {meta.get('base_model')!r}, "
            f"not {base.loaded.spec.name!r}",
            code="invalid_request",
        )
    name = inject(base, "smp", int(meta["lora"]["rank"]), tuple(meta["target_modules"]))
    params = adapter_params(base.module, name)
    try:
        checkpoint.check_layout(
            f"weights at {directory.name!r}", weights, {k: tuple(p.shape) for k, p in params}
        )
        checkpoint.check_finite(f"weights at {directory.name!r}", weights)
    except BadRequestError:
        delete_adapter(base, name)
        raise
    with torch.no_grad():
        for k, p in params:
            p.requires_grad_(False)
            p.copy_(weights[k].to(p.device, p.dtype))
    base.samplers[key] = name
    while len(base.samplers) > SAMPLER_CACHE_SIZE:
        _, old = base.samplers.popitem(last=False)
        delete_adapter(base, old)
    return name
