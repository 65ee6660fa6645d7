"""What a model trains -- a LoRA adapter, every weight, or nothing -- and the rules of create_model's fields.

A layout is a ``types.LoraConfig``: rank 1..``MAX_LORA_RANK`` is a LoRA adapter on the modules its
``train_*`` flags name; rank 0 is full-parameter training (feature ``"full_param"``): every weight of the
base model trains, in a copy the run holds, and the other fields do not apply (``FULL_PARAM`` is its one
form). A reference model (``reference``, feature ``"reference_forward"``) is frozen: the base model as it
is, forward only. A checkpoint loads only into a model of its layout. torch-free, like ``engine_api``
(which exports the layout rules with the others).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from .. import types
from .._errors import BadRequestError
from .._wire import shorten

__all__ = (
    "DEFAULT_LORA_RANK",
    "FULL_PARAM",
    "MAX_LORA_RANK",
    "SEED_RANGE",
    "USER_METADATA_ITEMS",
    "check_create",
    "check_lora",
    "check_lora_match",
    "check_seed",
    "check_trainable",
    "check_user_metadata",
    "describe_layout",
    "is_lora",
)

MAX_LORA_RANK: Final = 256  # bounds one run's adapter and optimizer memory
DEFAULT_LORA_RANK: Final = 32  # create_model without lora_config: create_lora_training_client's default
FULL_PARAM: Final = types.LoraConfig(rank=0)  # the layout of a full-parameter run
SEED_RANGE: Final = (0, 2**63)  # seeds are non-negative int64 (torch.manual_seed and numpy both take them)
# user_metadata lives in run.json and in every run listing, so it stays small
USER_METADATA_ITEMS: Final = 64
USER_METADATA_KEY: Final = 128  # characters
USER_METADATA_VALUE: Final = 1024  # characters


def is_lora(lora: types.LoraConfig) -> bool:
    return lora.rank != 0


def check_seed(seed: Any, what: str) -> None:
    low, high = SEED_RANGE
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed < high):
        raise BadRequestError(f"{what}: must be an integer in [0, 2**63), got {shorten(seed)}")


def check_lora(lora: types.LoraConfig) -> types.LoraConfig:
    """A create_model's lora_config, checked (BadRequestError naming the field); rank 0 comes back as
    ``FULL_PARAM``."""
    rank = lora.rank
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_LORA_RANK:
        raise BadRequestError(
            f"lora_config.rank: must be a LoRA rank between 1 and {MAX_LORA_RANK}, or 0 for full-parameter "
            f"training; got {shorten(rank)}"
        )
    if rank == 0:
        return FULL_PARAM
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise BadRequestError(
            "lora_config: train_attn, train_mlp and train_unembed are all false, so nothing would train; "
            "set at least one to true"
        )
    check_seed(lora.seed, "lora_config.seed")
    return lora


def describe_layout(lora: types.LoraConfig) -> str:
    """A layout in words: "full-parameter", "LoRA rank 8 (attn+mlp)"."""
    if not is_lora(lora):
        return "full-parameter"
    parts = [name for name in ("attn", "mlp", "unembed") if getattr(lora, f"train_{name}")]
    return f"LoRA rank {lora.rank} ({'+'.join(parts)})"


def check_lora_match(have: types.LoraConfig, want: types.LoraConfig, what: str) -> None:
    """A checkpoint (layout ``want``) fits a model (layout ``have``): both full-parameter, or LoRA with the
    same rank and trained modules; BadRequestError naming both layouts otherwise."""
    if is_lora(have) != is_lora(want):
        raise BadRequestError(
            f"{what} holds {describe_layout(want)} weights, but the model is {describe_layout(have)}; "
            f"load it into a {describe_layout(want)} model (create_training_client_from_state makes one)"
        )
    mismatch = [
        f"{name} {getattr(want, name)} (model has {getattr(have, name)})"
        for name in ("rank", "train_attn", "train_mlp", "train_unembed")
        if is_lora(have) and getattr(want, name) != getattr(have, name)
    ]
    if mismatch:
        raise BadRequestError(
            f"{what} has a different LoRA layout: {', '.join(mismatch)}; create the model with the "
            "checkpoint's lora_config to load it"
        )


def check_user_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """create_model's ``user_metadata``: at most USER_METADATA_ITEMS string pairs of bounded size."""
    if len(metadata) > USER_METADATA_ITEMS:
        raise BadRequestError(
            f"user_metadata: at most {USER_METADATA_ITEMS} entries, got {len(metadata)}; keep the rest "
            "elsewhere"
        )
    for key, value in metadata.items():
        if not 1 <= len(key) <= USER_METADATA_KEY or len(value) > USER_METADATA_VALUE:
            raise BadRequestError(
                f"user_metadata: key {shorten(key, 100)} must have 1-{USER_METADATA_KEY} characters and its "
                f"value at most {USER_METADATA_VALUE} (it has {len(value)})"
            )
    return dict(metadata)


def check_create(req: types.CreateModelRequest) -> tuple[types.LoraConfig, bool, dict[str, str] | None]:
    """(layout, frozen, user_metadata) of a create_model request, checked. Without ``lora_config`` a model
    is LoRA of DEFAULT_LORA_RANK; ``reference`` makes a frozen one (feature "reference_forward")."""
    metadata = None if req.user_metadata is msgspec.UNSET else check_user_metadata(req.user_metadata)
    if req.reference is not True:
        return check_lora(req.lora_config or types.LoraConfig(rank=DEFAULT_LORA_RANK)), False, metadata
    if req.lora_config is not None or metadata is not None:
        raise BadRequestError(
            f"{'lora_config' if req.lora_config is not None else 'user_metadata'}: a reference model "
            "(reference: true) is the base model as it is, with no weights to train and no run record; "
            "leave lora_config and user_metadata out"
        )
    return FULL_PARAM, True, None


def check_trainable(model_id: str, frozen: bool, what: str) -> None:
    """400 for a training request (``what``) to a forward-only reference model."""
    if frozen:
        raise BadRequestError(
            f"model {model_id} is a forward-only reference model (create_model reference: true), so it "
            f"cannot {what}: it only gives the base model's forward; train a model made with "
            "create_lora_training_client or create_training_client",
            code="forward_only",
        )
