"""Checkpoint lifetimes (the ``"ttl"`` feature): which checkpoints expire when, and what an expired one says.

A save with ``ttl_seconds`` records ``expires`` (save time + ttl) in the checkpoint's ``meta.json``. The store
keeps an index of the checkpoints that expire (rebuilt from the metadata when it opens) so that the periodic
sweep (``lifecycle.py``, on the server's expiry tick) looks at those alone, and the names of the checkpoints
it removed (the newest ``TOMBSTONES``), so that asking for one of them answers "expired" rather than "does
not exist". The files themselves are removed by the store (``Store.expire``), atomically as a delete is.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections import OrderedDict
from typing import Final

from .._errors import NotFoundError

__all__ = ("EXPIRED_CODE", "TOMBSTONES", "TTL_MAX_SECONDS", "Expiries", "expired_error")

TTL_MAX_SECONDS: Final = 10 * 365 * 24 * 3600  # ten years, Tinker's bound
TOMBSTONES: Final = 10_000  # expired checkpoints remembered by name (in memory; a restart forgets them)
EXPIRED_CODE: Final = "checkpoint_expired"  # the error body's code for an expired checkpoint

Key = tuple[str, str]  # (run_id, checkpoint_id)


def expired_error(run_id: str, checkpoint_id: str, expires: _dt.datetime) -> NotFoundError:
    return NotFoundError(
        f"checkpoint {checkpoint_id[:200]!r} of run {run_id!r} expired at {expires.isoformat()} (it was "
        "saved with ttl_seconds) and was deleted; save it again, without ttl_seconds to keep it",
        code=EXPIRED_CODE,
    )


class Expiries:
    """When each expiring checkpoint expires, and which ones were removed for it; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[Key, _dt.datetime] = {}
        self._gone: OrderedDict[Key, _dt.datetime] = OrderedDict()

    def saved(self, key: Key, expires: _dt.datetime | None) -> None:
        """Checkpoint ``key`` was (re)saved, expiring at ``expires`` (None: never)."""
        with self._lock:
            self._gone.pop(key, None)
            if expires is None:
                self._due.pop(key, None)
            else:
                self._due[key] = expires

    def removed(self, key: Key, expires: _dt.datetime | None = None) -> None:
        """Checkpoint ``key`` is gone: deleted (``expires`` None) or removed because it expired."""
        with self._lock:
            self._due.pop(key, None)
            if expires is not None:
                self._gone[key] = expires
                self._gone.move_to_end(key)
                while len(self._gone) > TOMBSTONES:
                    self._gone.popitem(last=False)

    def due(self, now: _dt.datetime) -> list[Key]:
        """The checkpoints whose time has come (the sweep removes them)."""
        with self._lock:
            return [key for key, at in self._due.items() if at <= now]

    def gone(self, key: Key) -> _dt.datetime | None:
        """When checkpoint ``key`` expired, if the store removed it for that."""
        with self._lock:
            return self._gone.get(key)
