"""One model's ``seq_id`` order: the next expected id, requests waiting for their turn, and skipped ids.

A pure state machine (no event loop, no device): the scheduler feeds it requests, rejections and releases,
and runs the jobs it hands back, in order. The rules, in one place:

* the first id after ``create_model`` is 1 (PROTOCOL.md §4.2); a request waits until every lower id of its
  model ran, was rejected (its turn passes as a no-op) or was released (``POST /api/v1/release_seq``);
* an id more than ``SEQ_WINDOW`` ahead of the next expected one is refused (400 ``seq_out_of_window``) and
  changes nothing: one stray id must not make the run wait for, or skip, a thousand others;
* an id behind the sequence was used already: 409 ``sequence_conflict``, never run twice;
* a gap that does not fill (the scheduler's timeout) fails the requests waiting behind it. When they follow
  the missing id without a further hole -- a client that lost one request and went on -- the run continues
  after them; a request beyond a further hole is a stray: it fails and the sequence stays where it was.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Generic, TypeVar

import msgspec

from .._errors import APIError, BadRequestError, ConflictError

__all__ = ("MAX_REJECTED_KEPT", "SEQ_WINDOW", "ReleaseSeqRequest", "SeqOrder")

J = TypeVar("J")
R = TypeVar("R")

# How far ahead of the next expected id a request may be. The client (PROTOCOL.md "seq_id" extension) never
# reserves more than this many ids ahead of what it sent; 1024 is far more than any pipeline keeps in flight.
SEQ_WINDOW = 1024
# Rejected requests remembered per model (to answer a retry of the same bad body the same way); the oldest go
# first. A retry comes within seconds, so the last SEQ_WINDOW are plenty.
MAX_REJECTED_KEPT = SEQ_WINDOW

SEQUENCE_CONFLICT = "sequence_conflict"
SEQ_OUT_OF_WINDOW = "seq_out_of_window"


class ReleaseSeqRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /api/v1/release_seq``: a reserved seq_id of ``model_id`` that will never be sent."""

    model_id: str
    seq_id: Annotated[int, msgspec.Meta(ge=1)]


@dataclass(eq=False, slots=True)
class SeqOrder(Generic[J, R]):
    """The order of one model's requests: ``J`` is a queued job, ``R`` the record (future) of a request."""

    model_id: str
    next_seq: int = 1
    waiting: dict[int, J | None] = field(default_factory=dict)  # None: a rejected or released id, skipped
    seqs: dict[int, R] = field(default_factory=dict)  # accepted ids -> their records, while remembered
    rejected: OrderedDict[int, tuple[bytes, APIError]] = field(default_factory=OrderedDict)

    @property
    def next_seq_id(self) -> int:
        """The seq_id the model's next request must carry (``GetInfoResponse.next_seq_id``)."""
        return self.next_seq

    def check(self, seq_id: int) -> None:
        """Raise the 409 or 400 of a seq_id that cannot take a turn now (behind, or too far ahead)."""
        if seq_id < self.next_seq:
            raise ConflictError(
                f"seq_id {seq_id} of model {self.model_id} is behind the model's sequence, which is at "
                f"{self.next_seq}: that id ran already, or was skipped; continue with seq_id {self.next_seq} "
                "(get_info answers next_seq_id)",
                code=SEQUENCE_CONFLICT,
            )
        if seq_id - self.next_seq > SEQ_WINDOW:
            raise BadRequestError(
                f"seq_id: {seq_id} is more than {SEQ_WINDOW} ahead of model {self.model_id}'s next expected "
                f"seq_id {self.next_seq}; the request was refused and the model's sequence is unchanged "
                "(get_info answers next_seq_id)",
                code=SEQ_OUT_OF_WINDOW,
            )

    def rejected_before(self, seq_id: int) -> tuple[bytes, APIError] | None:
        """The (fingerprint, error) of the request that was rejected with ``seq_id``, if remembered."""
        return self.rejected.get(seq_id)

    def add(self, seq_id: int, job: J, record: R) -> list[J]:
        """Queue ``job`` for its turn (call ``check`` first); the jobs that may run now, in order."""
        self.seqs[seq_id] = record
        self.waiting[seq_id] = job
        return self.advance()

    def _free(self, seq_id: int) -> bool:
        in_window = 0 <= seq_id - self.next_seq <= SEQ_WINDOW
        return in_window and seq_id not in self.waiting and seq_id not in self.seqs

    def skip(self, seq_id: int, fingerprint: bytes, error: APIError) -> list[J]:
        """A request with ``seq_id`` was rejected: its turn passes as a no-op (if the id is still free)."""
        if not self._free(seq_id):
            return []
        self.rejected[seq_id] = (fingerprint, error)
        while len(self.rejected) > MAX_REJECTED_KEPT:
            self.rejected.popitem(last=False)
        self.waiting[seq_id] = None
        return self.advance()

    def release(self, seq_id: int) -> list[J]:
        """``seq_id`` will never be sent: skip it now. Idempotent; an id already received is left alone."""
        if seq_id - self.next_seq > SEQ_WINDOW:
            self.check(seq_id)
        if not self._free(seq_id):
            return []
        self.waiting[seq_id] = None
        return self.advance()

    def advance(self) -> list[J]:
        """Pop the waiting jobs that are next in order."""
        ready: list[J] = []
        while self.next_seq in self.waiting:
            job = self.waiting.pop(self.next_seq)
            self.next_seq += 1
            if job is not None:
                ready.append(job)
        return ready

    def give_up_gap(self) -> tuple[list[J], int]:
        """The gap at ``next_seq`` did not fill: the waiting jobs to fail, and the id that was missing.

        The run continues after the waiting ids that follow the gap without a further hole; stray ids
        further ahead are forgotten (their records fail) and do not move the sequence.
        """
        missing = self.next_seq
        jobs = [job for _, job in sorted(self.waiting.items()) if job is not None]
        end = missing + 1
        while end in self.waiting:
            end += 1
        if end > missing + 1:  # a lost request with the ones after it: skip it and them
            self.next_seq = end
        for seq in [s for s in self.waiting if s > end]:  # strays: free their ids again
            self.seqs.pop(seq, None)
        self.waiting.clear()
        return jobs, missing

    def forget(self, seq_id: int, record: R) -> None:
        """``record``'s result expired: it no longer answers a retry of ``seq_id``."""
        if self.seqs.get(seq_id) is record:
            del self.seqs[seq_id]
