"""The service's checkpoint rules: what a save is named and how it is written, and what a model may load.

A save is named by its request (``path``, checked as one folder name) or automatically, may be given a
lifetime (``ttl_seconds``, 1 s to ten years: it expires that long after it was written), and is written into a
fresh work folder that the store commits atomically or discards; a load must match the model's base model and
LoRA layout, and loads optimizer state only from a training checkpoint.

A sampler save may name its ``checkpoint_type`` (feature ``"checkpoint_type"``): ``"base"`` is full weights
that serve on their own -- for a LoRA run its adapter merged into a copy of the base model's weights, a
full-parameter checkpoint of layout ``FULL_PARAM`` (``merged`` in its meta.json) -- and ``"delta"`` the LoRA
adapter, which only a LoRA run has. Without it a save is the run's own kind.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any

import msgspec

from .. import types
from .._errors import BadRequestError
from .._wire import shorten
from .engine_api import EngineAPI, check_lora_match
from .expiry import TTL_MAX_SECONDS
from .layout import FULL_PARAM, check_user_metadata, is_lora
from .scheduler import ModelState
from .store import CheckpointMeta, Store, check_name, checkpoint_id_for, checkpoint_path_for, utcnow

__all__ = (
    "CHECKPOINT_TYPES",
    "check_checkpoint_type",
    "check_loadable",
    "check_ttl",
    "new_checkpoint",
    "save",
)


def check_ttl(value: object) -> int | None:
    """A save's ``ttl_seconds`` (None when not given), or BadRequestError saying what is allowed."""
    if value is msgspec.UNSET or value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= TTL_MAX_SECONDS:
        raise BadRequestError(
            f"ttl_seconds: must be a whole number of seconds from 1 to {TTL_MAX_SECONDS} (ten years), got "
            f"{shorten(value, 50)}; leave it out to keep the checkpoint until it is deleted"
        )
    return value


CHECKPOINT_TYPES = ("base", "delta")  # a sampler save's checkpoint_type: full weights, or a LoRA adapter


def check_checkpoint_type(req: types.SaveWeightsRequest, model: ModelState, kind: str) -> bool:
    """Whether the save merges a LoRA run's adapter into the base weights (``checkpoint_type`` "base" on a
    LoRA run); BadRequestError naming the field when the value, the save or the run does not allow it."""
    value = req.checkpoint_type
    if value is msgspec.UNSET or value is None:
        return False
    if value not in CHECKPOINT_TYPES:
        raise BadRequestError(
            f"checkpoint_type: must be 'base' (full weights that serve on their own) or 'delta' (the LoRA "
            f"adapter), got {shorten(value, 50)}; leave it out for the run's own kind"
        )
    if kind == "training":
        raise BadRequestError(
            "checkpoint_type: applies to sampler weights (save_weights_for_sampler), not to a training-state "
            "save; leave it out of save_weights"
        )
    if value == "delta" and not is_lora(model.lora_config):
        raise BadRequestError(
            f"checkpoint_type: 'delta' is a LoRA adapter, but model {model.model_id} is a full-parameter run "
            "(no adapter to save); use checkpoint_type='base' or leave it out"
        )
    return value == "base" and is_lora(model.lora_config)


def new_checkpoint(req: types.SaveWeightsRequest, model: ModelState, kind: str) -> CheckpointMeta:
    """The checkpoint a save request of ``kind`` ("training" or "sampler") will write; 400 for a bad name."""
    if req.path is msgspec.UNSET or req.path is None:
        name = f"auto-{utcnow():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    else:
        assert isinstance(req.path, str)
        name = check_name(req.path, "path")
    ttl = check_ttl(req.ttl_seconds)
    metadata = None if req.user_metadata is msgspec.UNSET else check_user_metadata(req.user_metadata)
    merged = check_checkpoint_type(req, model, kind)
    ckpt_id = checkpoint_id_for(name, kind)
    return CheckpointMeta(
        checkpoint_id=ckpt_id,
        checkpoint_type="training" if kind == "training" else "sampler",
        time=utcnow(),
        checkpoint_path=checkpoint_path_for(model.model_id, ckpt_id, kind),
        run_id=model.model_id,
        base_model=model.base_model,
        lora_config=FULL_PARAM if merged else model.lora_config,  # the checkpoint's layout
        name=name,
        ttl_seconds=ttl,
        merged=merged,
        user_metadata=metadata,
    )


def check_loadable(req: types.LoadWeightsRequest, meta: CheckpointMeta, model: ModelState) -> bool:
    """Whether loading ``meta`` into ``model`` loads optimizer state; 400 when the checkpoint does not fit."""
    if meta.base_model != model.base_model:
        raise BadRequestError(
            f"path: {shorten(req.path)} was trained on {meta.base_model!r} but model {model.model_id} uses "
            f"{model.base_model!r}; create a model on {meta.base_model!r} to load it "
            "(create_training_client_from_state does this)"
        )
    if meta.merged and is_lora(model.lora_config):
        raise BadRequestError(
            f"path: {shorten(req.path)} holds a LoRA adapter merged into full weights (checkpoint_type "
            f"'base'), but model {model.model_id} is a LoRA run; load it into a full-parameter model "
            "(create_training_client(base_model=..., lora_rank=0)), or load the run's 'delta' checkpoint"
        )
    check_lora_match(model.lora_config, meta.lora_config, f"path: {shorten(req.path)}")
    if req.optimizer is msgspec.UNSET:
        return meta.checkpoint_type == "training"
    if req.optimizer and meta.checkpoint_type != "training":
        raise BadRequestError(
            f"optimizer: {shorten(req.path)} is a sampler checkpoint and holds no optimizer state; "
            "load it with optimizer=false, or load a training checkpoint (save_state)"
        )
    return bool(req.optimizer)


def save(engine: EngineAPI, store: Store, meta: CheckpointMeta, kind: str) -> Any:
    """Write the model's weights (and optimizer state for a training checkpoint) as ``meta``, atomically."""
    work = store.new_work_dir()
    try:
        engine.save(meta.run_id, work, optimizer=kind == "training", merged=meta.merged)
        saved = utcnow()  # the time it was written: its lifetime starts now
        expires = None if meta.ttl_seconds is None else saved + _dt.timedelta(seconds=meta.ttl_seconds)
        store.commit_checkpoint(work, msgspec.structs.replace(meta, time=saved, expires=expires))
    except BaseException:
        store.discard_work_dir(work)
        raise
    store.flush()
    if kind == "training":
        return types.SaveWeightsResponse(path=meta.checkpoint_path)
    return types.SaveWeightsForSamplerResponse(path=meta.checkpoint_path)
