"""The REST structs: training runs, checkpoints, their listings, and the official ``ParsedCheckpointPath``."""

from __future__ import annotations

import datetime as _dt

from msgspec import UNSET, Struct, UnsetType

from .. import _wire
from . import CheckpointType, LoraConfig

__all__ = (
    "Checkpoint",
    "CheckpointsListResponse",
    "Cursor",
    "ParsedCheckpointPath",
    "TrainingRun",
    "TrainingRunsResponse",
)


class Checkpoint(Struct, kw_only=True):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: _dt.datetime
    checkpoint_path: str
    # upstream Tinker's, sent by our server only when set: when a checkpoint saved with ttl_seconds expires,
    # and the user_metadata it was saved with
    expires_at: _dt.datetime | UnsetType = UNSET
    user_metadata: dict[str, str] | UnsetType = UNSET


class ParsedCheckpointPath(Struct, kw_only=True):
    """A checkpoint path and its parts: ``hpcai://{training_run_id}/{checkpoint_type}/{checkpoint_id}``.

    The official SDK's type; ``parse`` accepts every spelling the client does (``hpcai://`` and
    ``tinker://``, ``weights`` / ``sampler_weights`` as well as ``training`` / ``sampler``) and raises
    ``ConfigurationError`` (a ``ValueError``, as the official parser raises) for anything else.
    """

    checkpoint_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def parse(cls, path: str) -> ParsedCheckpointPath:
        parts = _wire.parse_checkpoint_path(path)
        return cls(
            checkpoint_path=path,
            training_run_id=parts.training_run_id,
            checkpoint_type=parts.checkpoint_type,
            checkpoint_id=parts.checkpoint_id,
        )

    @classmethod
    def from_checkpoint_path(cls, checkpoint_path: str) -> ParsedCheckpointPath:
        return cls.parse(checkpoint_path)

    @classmethod
    def from_hpcai_path(cls, path: str) -> ParsedCheckpointPath:
        return cls.parse(path)

    def to_path(self) -> str:
        return f"{self.training_run_id}/{self.checkpoint_type}/{self.checkpoint_id}"

    def to_uri(self) -> str:
        return f"hpcai://{self.to_path()}"


class CheckpointsListResponse(Struct, kw_only=True):
    checkpoints: list[Checkpoint]


class TrainingRun(Struct, kw_only=True):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: _dt.datetime
    corrupted: bool = False
    lora_rank: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    # Ours: the run's full LoRA layout, so a run recreated from a checkpoint gets the same target modules
    # (the hosted service sends only lora_rank; then the create_lora_training_client defaults apply).
    lora_config: LoraConfig | UnsetType = UNSET
    user_metadata: dict[str, str] | UnsetType = UNSET  # ours and upstream Tinker's: given at creation


class Cursor(Struct, kw_only=True):
    offset: int
    limit: int
    total_count: int


class TrainingRunsResponse(Struct, kw_only=True):
    training_runs: list[TrainingRun]
    cursor: Cursor
