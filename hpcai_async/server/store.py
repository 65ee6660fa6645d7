"""Runs and checkpoints on disk: the layout, atomic writes, listings, one server per store, no link out.

Layout of a store folder (everything survives a restart; a new server on the same folder lists it all)::

    runs/{run_id}/run.json                                   base model, LoRA config, owner, times, metadata
    runs/{run_id}/checkpoints/{checkpoint_id}/meta.json      kind, time, path, expiry, what the files hold
    runs/{run_id}/checkpoints/{checkpoint_id}/...            the engine's files (safetensors + JSON)
    tmp/                                                     work folders; emptied when a store opens
    lock                                                     held (flock) by the one server using the store

Checkpoint ids and paths follow the hosted service (PROTOCOL.md §5.8): ``save_weights(name)`` makes
``{name}_training`` at ``hpcai://{run}/weights/{name}_training``; ``save_weights_for_sampler(name)`` makes
``{name}_sampler`` at ``hpcai://{run}/sampler_weights/{name}_sampler``. The SDK's own form
``hpcai://{run}/training|sampler/{id}`` (and ``tinker://``) is accepted too; ``_wire`` parses the paths.

Writes are atomic. A checkpoint is written into a folder under ``tmp/`` (same file system), every file and the
folder are fsynced, then the folder is renamed into place. Saving under a name that exists replaces the old
checkpoint, as the hosted service does: the old folder is first renamed away into ``tmp/``, then the new one
is renamed in. A crash between the two renames leaves no checkpoint of that name (never a half-written or
mixed one), and whatever is left in ``tmp/`` is deleted the next time the store opens. JSON files are written
to a temporary name, fsynced and ``os.replace``-d; a temporary JSON file a crash left behind is deleted when
the store opens.

One server per store: opening a store takes an exclusive lock on ``lock`` (which holds the server's pid), so a
second server on the same folder fails at start with an error naming the first, instead of wiping its saves in
progress. The lock ends with the process, however it ends.

A checkpoint saved with ``ttl_seconds`` expires (``expiry.py``): from then on it is in no listing, cannot be
loaded, sampled, downloaded or deleted (404 saying it expired), and its folder goes as a delete's does --
renamed into ``tmp/`` under the store's lock (a save of the same name at that moment wins or loses whole),
then removed. Whatever finds it expired removes it (a lookup, a listing), and the server's periodic sweep
removes the ones nobody asked for (``Store.sweep``).

Nothing outside the store is ever read, listed, archived, loaded or deleted through the server: links are
never followed. A run or checkpoint folder that is a link, or a checkpoint holding a link anywhere inside, is
not a checkpoint of this store (not listed, 404); archive files are opened with ``O_NOFOLLOW``. Error messages
name runs and checkpoints, never the store's own path."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Literal

import msgspec

from .. import types
from .._errors import BadRequestError, NotFoundError
from .._wire import (
    _NAME_RE,
    _RUN_ID_RE,
    checkpoint_id_for,
    checkpoint_path_for,
    parse_checkpoint_path,
    shorten,
)
from .archive import iter_archive
from .expiry import EXPIRED_CODE, Expiries, expired_error
from .files import fsync_dir, fsync_tree, holds_link, is_real, lock_store, read_file, write_json_atomic
from .layout import is_lora

__all__ = (
    "CheckpointMeta",
    "CheckpointRef",
    "RunRecord",
    "Store",
    "checkpoint_id_for",
    "checkpoint_path_for",
    "utcnow",
)


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class RunRecord(msgspec.Struct, kw_only=True):
    """``run.json``: one training run (the same id as the model id ``create_model`` returned)."""

    run_id: str
    base_model: str
    lora_config: types.LoraConfig
    owner: str
    created: _dt.datetime
    last_request_time: _dt.datetime
    corrupted: bool = False
    user_metadata: dict[str, str] | None = None


class CheckpointMeta(msgspec.Struct, kw_only=True):
    """``meta.json`` of one checkpoint."""

    checkpoint_id: str
    checkpoint_type: Literal["training", "sampler"]
    time: _dt.datetime
    checkpoint_path: str
    run_id: str
    base_model: str
    lora_config: types.LoraConfig
    name: str
    step: int | None = None
    ttl_seconds: int | None = None  # saved with ttl_seconds ("ttl"): deleted at ``expires``
    expires: _dt.datetime | None = None
    merged: bool = False  # a LoRA run's adapter merged into the base weights (checkpoint_type "base")
    user_metadata: dict[str, str] | None = None  # given with the save ("user_metadata")

    def expired(self, now: _dt.datetime) -> bool:
        return self.expires is not None and self.expires <= now

    def to_wire(self) -> types.Checkpoint:
        return types.Checkpoint(
            checkpoint_id=self.checkpoint_id,
            checkpoint_type=self.checkpoint_type,
            time=self.time,
            checkpoint_path=self.checkpoint_path,
            expires_at=self.expires if self.expires is not None else msgspec.UNSET,
            user_metadata=self.user_metadata if self.user_metadata is not None else msgspec.UNSET,
        )


class CheckpointRef(msgspec.Struct, frozen=True):
    """A checkpoint found on disk: its metadata and its folder."""

    meta: CheckpointMeta
    directory: Path


def check_name(name: str, field: str = "path") -> str:
    """A checkpoint name given by a user, or BadRequestError saying what is allowed."""
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise BadRequestError(
            f"{field}: {name!r} is not a valid checkpoint name; use 1-200 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, no '/'), e.g. 'step-100'"
        )
    return name


_run_decoder = msgspec.json.Decoder(RunRecord)
_meta_decoder = msgspec.json.Decoder(CheckpointMeta)


class Store:
    """The runs and checkpoints of one server, in ``root`` (a temporary folder, deleted on close, if None).

    Thread-safe: the event loop lists and deletes, the device worker thread commits checkpoints.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="hpcai-async-store-") if root is None else root).resolve()
        self.runs_dir = self.root / "runs"
        self.tmp_dir = self.root / "tmp"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = lock_store(self.root / "lock")
        # Leftovers of an interrupted save or delete: never valid checkpoints, so they go.
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._runs: dict[str, RunRecord] = {}
        self._dirty: set[str] = set()
        for run_dir in self.runs_dir.iterdir():
            if not is_real(run_dir) or not run_dir.is_dir():
                continue  # a link (it could lead anywhere) or a stray file: not a run
            for orphan in run_dir.glob(".run.json.*.tmp"):  # a run.json write a crash interrupted
                orphan.unlink(missing_ok=True)
            try:
                run = _run_decoder.decode(read_file(run_dir / "run.json"))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue  # not a run (or a run.json from an interrupted first write): skip it
            if run.run_id == run_dir.name:
                self._runs[run.run_id] = run
        self.expiries = Expiries()
        for run_id in list(self._runs):
            for meta in self._metas(run_id):
                if meta.expires is not None:
                    self.expiries.saved((run_id, meta.checkpoint_id), meta.expires)
        self.sweep()  # what expired while no server ran

    def close(self) -> None:
        self.flush()
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # ------------------------------------------------------------------------------------------------ runs

    def add_run(self, run: RunRecord) -> None:
        run_dir = self.runs_dir / run.run_id
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run.json", run)
        with self._lock:
            self._runs[run.run_id] = run

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            return self._runs.get(run_id)

    def touch(self, run_id: str) -> None:
        """Record a request to ``run_id`` now (written to disk by the next ``flush``)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.last_request_time = utcnow()
                self._dirty.add(run_id)

    def flush(self) -> None:
        """Write the runs whose last_request_time changed since the last flush."""
        with self._lock:
            dirty = [self._runs[r] for r in self._dirty if r in self._runs]
            self._dirty.clear()
        for run in dirty:
            with contextlib.suppress(OSError):  # a best-effort timestamp; the run itself is already on disk
                write_json_atomic(self.runs_dir / run.run_id / "run.json", run)

    def list_runs(self, limit: int, offset: int) -> tuple[list[RunRecord], int]:
        """Runs newest first (by creation), ``limit`` of them from ``offset``; and the total count."""
        with self._lock:
            runs = sorted(self._runs.values(), key=lambda r: (r.created, r.run_id), reverse=True)
        return runs[offset : offset + limit], len(runs)

    def training_run(self, run: RunRecord) -> types.TrainingRun:
        """The run as the REST routes show it (a full-parameter run: is_lora false, lora_rank null)."""
        ckpts = self.list_checkpoints(run.run_id)
        lora = is_lora(run.lora_config)
        last = {
            kind: next((c for c in reversed(ckpts) if c.checkpoint_type == kind), None)
            for kind in ("training", "sampler")
        }
        return types.TrainingRun(
            training_run_id=run.run_id,
            base_model=run.base_model,
            model_owner=run.owner,
            is_lora=lora,
            corrupted=run.corrupted,
            lora_rank=run.lora_config.rank if lora else None,
            lora_config=run.lora_config if lora else msgspec.UNSET,
            last_request_time=run.last_request_time,
            last_checkpoint=last["training"],
            last_sampler_checkpoint=last["sampler"],
            user_metadata=msgspec.UNSET if run.user_metadata is None else run.user_metadata,
        )

    # -------------------------------------------------------------------------------------------- checkpoints

    def _run_dir(self, run_id: str) -> Path:
        run_dir = self.runs_dir / run_id
        if not _RUN_ID_RE.fullmatch(run_id) or self.get_run(run_id) is None or not is_real(run_dir):
            raise NotFoundError(
                f"training run {run_id[:200]!r} does not exist on this server; list the runs with "
                "GET /api/v1/training_runs"
            )
        return run_dir

    def new_work_dir(self) -> Path:
        """An empty folder under ``tmp/`` for the engine to save into (then ``commit_checkpoint`` it)."""
        return Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="save-"))

    def commit_checkpoint(self, work_dir: Path, meta: CheckpointMeta) -> None:
        """Make ``work_dir`` (filled by the engine) the checkpoint ``meta`` describes, atomically."""
        write_json_atomic(work_dir / "meta.json", meta)
        fsync_tree(work_dir)
        parent = self._run_dir(meta.run_id) / "checkpoints"
        parent.mkdir(exist_ok=True)
        dest = parent / meta.checkpoint_id
        with self._lock:  # one replace at a time, so two saves of one name cannot interleave their renames
            if dest.exists():
                trash = self.tmp_dir / f"old-{uuid.uuid4().hex}"
                os.rename(dest, trash)
                os.rename(work_dir, dest)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(work_dir, dest)
            self.expiries.saved((meta.run_id, meta.checkpoint_id), meta.expires)
        fsync_dir(parent)

    def discard_work_dir(self, work_dir: Path) -> None:
        shutil.rmtree(work_dir, ignore_errors=True)

    def _metas(self, run_id: str) -> list[CheckpointMeta]:
        """The metadata of every checkpoint of the run, expired ones too, in no order."""
        try:
            entries = list((self._run_dir(run_id) / "checkpoints").iterdir())
        except FileNotFoundError:
            return []
        return [meta for entry in entries if (meta := self._read_meta(entry)) is not None]

    def list_checkpoints(self, run_id: str) -> list[types.Checkpoint]:
        """The run's checkpoints, oldest first; expired ones are removed instead of listed."""
        now = utcnow()
        out: list[CheckpointMeta] = []
        for meta in self._metas(run_id):
            if meta.expired(now):
                self.expire(run_id, meta.checkpoint_id)
            else:
                out.append(meta)
        out.sort(key=lambda m: (m.time, m.checkpoint_id))
        return [m.to_wire() for m in out]

    @staticmethod
    def _read_meta(directory: Path) -> CheckpointMeta | None:
        """The metadata of the checkpoint in ``directory``, or None if it is not one (or holds a link)."""
        if not is_real(directory) or holds_link(directory) is not None:
            return None
        try:
            meta = _meta_decoder.decode(read_file(directory / "meta.json"))
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        return meta if meta.checkpoint_id == directory.name else None

    def get_checkpoint(self, run_id: str, checkpoint_id: str) -> CheckpointRef:
        """The checkpoint ``checkpoint_id`` of ``run_id``, or NotFoundError naming what exists (or saying
        that it expired: then its folder is removed now, if no sweep did it yet)."""
        run_dir = self._run_dir(run_id)
        if _NAME_RE.fullmatch(checkpoint_id) and ".." not in checkpoint_id:
            directory = run_dir / "checkpoints" / checkpoint_id
            meta = self._read_meta(directory)
            if meta is not None and meta.expired(utcnow()):
                self.expire(run_id, checkpoint_id)
            elif meta is not None:
                return CheckpointRef(meta, directory)
        raise self._no_checkpoint(run_id, checkpoint_id)

    def _no_checkpoint(self, run_id: str, checkpoint_id: str) -> NotFoundError:
        expired = self.expiries.gone((run_id, checkpoint_id))
        if expired is not None:
            return expired_error(run_id, checkpoint_id, expired)
        have = [c.checkpoint_id for c in self.list_checkpoints(run_id)]
        return NotFoundError(
            f"checkpoint {checkpoint_id[:200]!r} of run {run_id!r} does not exist; "
            + (f"the run has {', '.join(have)}"[:400] if have else "the run has no checkpoints")
        )

    def resolve(self, path: str, field: str = "path") -> CheckpointRef:
        """The checkpoint an ``hpcai://`` path names (either form); 400 if malformed, 404 if unknown."""
        run_id, kind, ckpt = parse_checkpoint_path(path, field=field, strict=True, error=BadRequestError)
        if self.get_run(run_id) is None:
            raise NotFoundError(
                f"{field}: {shorten(path)} names training run {run_id!r}, which does not exist on this server"
            )
        try:
            ref = self.get_checkpoint(run_id, ckpt)
        except NotFoundError:
            # the SDK's form hpcai://run/training/step1 names what the hosted service calls step1_training
            if ckpt.endswith(f"_{kind}"):
                raise
            try:
                ref = self.get_checkpoint(run_id, checkpoint_id_for(ckpt, kind))
            except NotFoundError as exc:
                what = "expired" if exc.code == EXPIRED_CODE else "does not exist"
                message = f"{field}: {shorten(path)} {what}: {exc.message}"
                raise NotFoundError(message, code=exc.code) from None
        if ref.meta.checkpoint_type != kind:
            raise NotFoundError(
                f"{field}: {shorten(path)} names a {kind} checkpoint but {ref.meta.checkpoint_id!r} is a "
                f"{ref.meta.checkpoint_type} checkpoint at {ref.meta.checkpoint_path}"
            )
        return ref

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        ref = self.get_checkpoint(run_id, checkpoint_id)
        trash = self.tmp_dir / f"del-{uuid.uuid4().hex}"
        try:
            with self._lock:
                os.rename(ref.directory, trash)  # gone from listings at once; the files go below
                self.expiries.removed((run_id, checkpoint_id))
        except FileNotFoundError:  # a concurrent delete of the same checkpoint won
            # raised outside the lock: building the message lists the run's checkpoints, which takes it
            raise self._no_checkpoint(run_id, checkpoint_id) from None
        shutil.rmtree(
            trash, ignore_errors=True
        )  # never follows links: a link inside is unlinked, not entered

    # ------------------------------------------------------------------------------------------------- expiry

    def expire(self, run_id: str, checkpoint_id: str) -> bool:
        """Remove checkpoint ``checkpoint_id`` of ``run_id`` if it has expired (True if this call did).

        The check and the rename are one step under the store's lock, so a save that replaces the
        checkpoint meanwhile is never removed, and concurrent sweeps remove it once; the files go after."""
        directory = self.runs_dir / run_id / "checkpoints" / checkpoint_id
        trash = self.tmp_dir / f"exp-{uuid.uuid4().hex}"
        with self._lock:
            meta = self._read_meta(directory)
            if meta is None or meta.expires is None or not meta.expired(utcnow()):
                if meta is None or meta.expires is None:
                    self.expiries.removed((run_id, checkpoint_id))  # gone, or saved again to stay
                return False
            try:
                os.rename(directory, trash)
            except FileNotFoundError:  # deleted meanwhile (by a delete, which holds no lock to read meta)
                return False
            self.expiries.removed((run_id, checkpoint_id), meta.expires)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def sweep(self) -> int:
        """Remove every expired checkpoint (the server runs this periodically); the number removed."""
        return sum(self.expire(run_id, ckpt) for run_id, ckpt in self.expiries.due(utcnow()))

    # ----------------------------------------------------------------------------------------------- archives

    def iter_archive(self, ref: CheckpointRef, level: int = 6) -> Generator[bytes, None, None]:
        """The checkpoint folder as a gzip-compressed tar, in chunks (``archive.iter_archive``)."""
        return iter_archive(ref.directory, ref.meta.checkpoint_id, level)
