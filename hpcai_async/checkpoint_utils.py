"""Resumable checkpoints in a log folder's checkpoints.jsonl (the official ``hpcai.checkpoint_utils``).

The file format is the official SDK's, so a run started with either client resumes with the other: one JSON
object a line, ``{"name": ..., **loop_state, "state_path": ..., "sampler_path": ...}`` (the paths present
for what was saved), appended after each save. ``get_last_checkpoint`` gives the last line that has
``required_key`` (a sampler-only save cannot resume training).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Literal

from ._futures import APIFuture
from .training import TrainingClient

__all__ = (
    "CHECKPOINTS_BASE_NAME",
    "get_last_checkpoint",
    "load_checkpoints_file",
    "read_jsonl",
    "save_checkpoint",
    "save_checkpoint_async",
)

CHECKPOINTS_BASE_NAME = "checkpoints.jsonl"
Kind = Literal["state", "sampler", "both"]

logger = logging.getLogger(__name__)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every line of ``path`` parsed as JSON."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def load_checkpoints_file(log_dir: str) -> list[dict[str, Any]]:
    """The records of ``log_dir/checkpoints.jsonl``, oldest first (``[]`` when there is no such file)."""
    path = os.path.join(log_dir, CHECKPOINTS_BASE_NAME)
    if not os.path.exists(path):
        logger.info("No checkpoints found at %s", path)
        return []
    return read_jsonl(path)


def get_last_checkpoint(log_dir: str, required_key: str = "state_path") -> dict[str, Any] | None:
    """The last record of ``log_dir`` that has ``required_key``, or None."""
    usable = [c for c in load_checkpoints_file(log_dir) if required_key in c]
    if not usable:
        logger.info("No checkpoints with key %r in %s", required_key, log_dir)
        return None
    logger.info("Using last checkpoint: %s", usable[-1])
    return usable[-1]


def _record(log_path: str, name: str, loop_state: dict[str, Any], paths: dict[str, str]) -> dict[str, str]:
    with open(os.path.join(log_path, CHECKPOINTS_BASE_NAME), "a") as f:
        f.write(json.dumps({"name": name, **loop_state, **paths}) + "\n")
    logger.info("Saved checkpoints: %s", paths)
    return paths


async def save_checkpoint_async(
    training_client: TrainingClient,
    name: str,
    log_path: str,
    loop_state: dict[str, Any],
    kind: Kind = "state",
) -> dict[str, str]:
    """Save ``name`` (training state, sampler weights or both), append its record; return the paths."""
    futures: dict[str, APIFuture[Any]] = {}
    if kind in ("state", "both"):
        futures["state"] = await training_client.save_state_async(name)
    if kind in ("sampler", "both"):
        futures["sampler"] = await training_client.save_weights_for_sampler_async(name)
    paths = {f"{key}_path": (await fut).path for key, fut in futures.items()}
    return _record(log_path, name, loop_state, paths)


def save_checkpoint(
    training_client: TrainingClient,
    name: str,
    log_path: str,
    loop_state: dict[str, Any],
    kind: Kind = "state",
) -> dict[str, str]:
    """Blocking ``save_checkpoint_async`` (through the client's blocking API, so no loop is started here)."""
    futures: dict[str, APIFuture[Any]] = {}
    if kind in ("state", "both"):
        futures["state"] = training_client.save_state(name)
    if kind in ("sampler", "both"):
        futures["sampler"] = training_client.save_weights_for_sampler(name)
    paths = {f"{key}_path": fut.result().path for key, fut in futures.items()}
    return _record(log_path, name, loop_state, paths)
