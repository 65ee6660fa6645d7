"""Full-parameter runs and full-weight samplers: each holds a copy of the base model of its own.

A full-parameter run (layout ``FULL_PARAM``, feature ``"full_param"``) trains every weight of its base model
in a copy loaded fresh from the model's folder, so no adapter of the shared base is in it and the shared base
stays untouched for the LoRA runs and for sampling. Its parameters are the copy's ``named_parameters()``
(tied weights once), saved under those names. Sampling from a full-parameter checkpoint loads such a copy
with the saved weights; a small LRU keeps ``FULL_SAMPLER_CACHE_SIZE`` of them (each is a whole model).

A LoRA run's ``checkpoint_type="base"`` save is such a checkpoint too (``merged_weights``): each weight its
adapter targets is the base weight plus the adapter's product (PEFT's ``get_delta_weight``), the others are
the base model's, computed without changing the shared base; it serves, and loads with plain transformers,
on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Final

from ..._errors import BadRequestError
from ..layout import FULL_PARAM
from ..models import ModelSpec
from . import checkpoint
from .adapters import Base, Run

__all__ = ("FULL_SAMPLER_CACHE_SIZE", "check_mergeable", "merged_weights", "new_run", "sampler_model")

FULL_SAMPLER_CACHE_SIZE: Final = 2  # full-weight models kept loaded for sampling (each a whole model)


def _bad(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_request")


def new_run(run_id: str, spec: ModelSpec, device: str) -> Run:
    """A full-parameter run: a fresh copy of ``spec``'s model with every weight trainable."""
    base = Base.load(spec, device)
    base.module.requires_grad_(True)
    return Run(
        run_id=run_id,
        base=base,
        adapter=None,
        lora=FULL_PARAM,
        targets=(),
        params=list(base.module.named_parameters()),
    )


def check_mergeable(run: Run) -> None:
    """400 unless each weight the run's adapter is on is a weight of its own: one tied to another (lm_head to
    the token embeddings, under tie_word_embeddings) would need two different values once merged. Reads only
    what loading fixed (``Base.tied``), so the server may call it from its event loop."""
    for target in run.targets:
        if any(n == f"{target}.weight" or n.endswith(f".{target}.weight") for n in run.base.tied):
            raise _bad(
                f"checkpoint_type: 'base' cannot merge the adapter on {target} of model {run.run_id}: that "
                "weight is tied to another one (tie_word_embeddings), so the merged model would need two; "
                "save checkpoint_type='delta', or train without train_unembed"
            )


def merged_weights(run: Run) -> dict[str, Any]:
    """A LoRA run's adapter merged into a copy of its base model's weights (``check_mergeable`` first): CPU
    float32 tensors by parameter name, as a full-parameter run saves them (tied weights once)."""
    import torch

    check_mergeable(run)
    weights: dict[str, Any] = {}
    for name, p in run.base.module.named_parameters():  # the base weights, named as in a model without PEFT
        parts = name.split(".")
        if not any(part.startswith("lora_") for part in parts):  # not an adapter's (this run's or another's)
            weights[".".join(x for x in parts if x != "base_layer")] = p.detach().to("cpu", torch.float32)
    with torch.no_grad():
        for name, layer in run.base.module.named_modules():
            if run.adapter in getattr(layer, "lora_A", ()):  # a PEFT LoRA layer holding the run's adapter
                delta = layer.get_delta_weight(run.adapter).to("cpu", torch.float32)
                weights[f"{name}.weight"] = weights[f"{name}.weight"] + delta
    return {k: v.contiguous() for k, v in weights.items()}


def sampler_model(cache: OrderedDict[str, Base], spec: ModelSpec, device: str, directory: Path) -> Base:
    """The model of the full-parameter checkpoint in ``directory``, loaded if needed (into ``cache``, an LRU
    of FULL_SAMPLER_CACHE_SIZE; a new save under the same name is loaded again)."""
    import torch

    try:
        stat = (directory / checkpoint.FULL_FILE).stat()
    except OSError:
        raise _bad(
            f"{directory.name!r} holds no {checkpoint.FULL_FILE}: not a full-parameter checkpoint"
        ) from None
    key = f"{directory.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    model = cache.get(key)
    if model is not None:
        cache.move_to_end(key)
        return model
    meta, weights = checkpoint.read_checkpoint(directory)
    if meta.get("base_model") != spec.name:
        raise _bad(
            f"the weights at {directory.name!r} are for base model {meta.get('base_model')!r}, "
            f"not {spec.name!r}"
        )
    model = Base.load(spec, device)
    params: list[tuple[str, Any]] = list(model.module.named_parameters())
    checkpoint.check_layout(f"weights at {directory.name!r}", weights, {k: tuple(p.shape) for k, p in params})
    checkpoint.check_finite(f"weights at {directory.name!r}", weights)
    with torch.no_grad():
        for k, p in params:
            p.copy_(weights[k].to(p.device, p.dtype))
    cache[key] = model
    while len(cache) > FULL_SAMPLER_CACHE_SIZE:
        cache.popitem(last=False)
    return model
