"""The device queue: submitting, per-model order and dedupe, sample batching, and the one engine thread.

How a request flows: a route validates it and calls ``submit`` (or ``submit_sample``) with a zero-argument
function to run on the device; the scheduler answers with a ``Record`` (the future) at once. Work goes to the
device queue, which one asyncio task drains in FIFO order, handing each job to a single-thread executor -- so
the engine sees one call at a time, the event loop only awaits, and health checks and long-polls answer while
the engine works.

Ordering (per model): a request with a ``seq_id`` waits for its turn (the rules are in ``ordering.py``). If
the next id does not arrive within ``seq_gap_timeout_s`` of a later one waiting, the waiting requests fail
with an error naming the missing id. Requests without ``seq_id`` run in arrival order. Different models
interleave on the device queue.

Idempotency: a request whose ``X-Idempotency-Key`` -- or, for ordered requests, whose (model_id, seq_id) --
was seen before gets the original future back (it is not run twice) when its route and body are
byte-identical, and ``ConflictError`` (409, code ``idempotency_conflict`` / ``sequence_conflict``) when they
differ. Keys are remembered as long as their result is.

A job that fails -- with any exception, even a ``BaseException`` from the engine, or a failure of the worker
itself -- finishes with an error; the jobs beside it still run, so no future is left "try again" forever.
Models that ended (unloaded or failed) are forgotten beyond the newest ``max_ended_models``.

Sampling: concurrent ``asample`` requests for the same (base model, adapter) join one open batch -- everything
that queued up while the device was busy, plus a window of ``sample_window_s`` -- and run as one
``engine.sample(jobs)`` call, capped at ``max_batch_sequences`` sequences.

The futures themselves (records, retention, long-poll waits) are ``futures.py``'s; the seq_id rules are
``ordering.py``'s. (Over 400 lines: the device queue, its batching and its failure handling are one state
machine; split, each half would reach into the other's state.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import types
from .._errors import APIError, BadRequestError, ConflictError, InternalServerError, NotFoundError
from .engine_api import EngineAPI, SampleJob
from .futures import Futures, Record, error_response
from .ordering import SEQUENCE_CONFLICT, SeqOrder

__all__ = ("ModelState", "Record", "Scheduler", "error_response")

log = logging.getLogger("hpcai_async.server")

MAX_JOB_GROUP = 64  # queued jobs handed to the device thread at once (each still finishes when it has run)
# Ended models (unloaded or failed) whose state is kept, so their requests answer "was unloaded"; a long-lived
# server creating a model per experiment must not keep every one of them.
MAX_ENDED_MODELS = 1000
IDEMPOTENCY_CONFLICT = "idempotency_conflict"


@dataclass(eq=False, slots=True)
class _Job:
    record: Record
    fn: Callable[[], Any]
    on_done: Callable[[Record], None] | None = None
    on_release: Callable[[], None] | None = None


@dataclass(eq=False, slots=True)
class _SampleBatch:
    key: tuple[str, str | None]
    created: float
    items: list[tuple[Record, SampleJob]] = field(default_factory=list)
    sequences: int = 0


@dataclass(eq=False, slots=True)
class ModelState:
    """A model created on this server: its base model, layout (LoRA config; rank 0: full-parameter), status
    and ordering state. ``frozen``: a forward-only reference model (create_model ``reference``)."""

    model_id: str
    base_model: str
    lora_config: types.LoraConfig
    frozen: bool = False
    status: str = "creating"  # creating | ready | failed | unloading | unloaded
    failure: str = ""
    order: SeqOrder[_Job, Record] = field(init=False)
    gap_timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.order = SeqOrder(self.model_id)

    @property
    def ended(self) -> bool:
        return self.status in ("failed", "unloaded")


class Scheduler(Futures):
    """See the module docstring: ``await start(engine_factory)`` on the server's loop, ``await stop()``."""

    def __init__(
        self,
        *,
        long_poll_s: float = 25.0,
        retention_s: float = 3600.0,
        seq_gap_timeout_s: float = 60.0,
        sample_window_s: float = 0.002,
        max_batch_sequences: int = 256,
        delivered_retention_s: float = 300.0,
    ) -> None:
        super().__init__(retention_s=retention_s, delivered_retention_s=delivered_retention_s)
        self.long_poll_s = long_poll_s
        self.seq_gap_timeout_s = seq_gap_timeout_s
        self.sample_window_s = sample_window_s
        self.max_batch_sequences = max_batch_sequences
        self.max_ended_models = MAX_ENDED_MODELS
        self.engine: EngineAPI | None = None
        self.models: dict[str, ModelState] = {}
        self._open_batches: dict[tuple[str, str | None], _SampleBatch] = {}
        self._queue: asyncio.Queue[_Job | _SampleBatch] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.busy = False  # the engine is running a job now (for tests and telemetry)

    # -------------------------------------------------------------------------------------------- lifecycle

    async def start(
        self, engine_factory: Callable[[], EngineAPI], on_tick: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Start the device thread, build the engine on it, and start the worker and the expiry tasks."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hpcai-device"
        )
        try:
            self.engine = await self._loop.run_in_executor(self._executor, engine_factory)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise
        self._tasks = [
            asyncio.create_task(self._worker(), name="hpcai-server-worker"),
            asyncio.create_task(self._reaper(on_tick), name="hpcai-server-reaper"),
        ]

    async def stop(self, close_engine: bool = True) -> None:
        """Stop the tasks, let a running engine call finish, close the engine (if it has ``close`` and
        ``close_engine``) and the device thread."""
        self.wake_all()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for model in self.models.values():
            if model.gap_timer is not None:
                model.gap_timer.cancel()
                model.gap_timer = None
        executor, self._executor = self._executor, None
        if executor is not None:
            assert self._loop is not None
            engine, self.engine = self.engine, None
            close = getattr(engine, "close", None) if close_engine else None
            live = [
                m.model_id for m in self.models.values() if m.status in ("creating", "ready", "unloading")
            ]

            def finish() -> None:
                if callable(close):
                    close()
                elif engine is not None:
                    # an engine we do not own (shared, e.g. across test servers): drop only our runs
                    for model_id in live:
                        if engine.has_run(model_id):
                            with contextlib.suppress(Exception):
                                engine.unload(model_id)

            # Queued after any running call (one thread, FIFO): waits for it without blocking the loop.
            await self._loop.run_in_executor(executor, finish)
            executor.shutdown(wait=True)

    # -------------------------------------------------------------------------------------------- records

    def find_duplicate(
        self, idem_key: str | None, fingerprint: bytes, model_id: str | None = None, seq_id: int | None = None
    ) -> Record | None:
        """The earlier future of the same request (by idempotency key, or model + seq_id), or None.

        Raises ConflictError (409) when the key or the seq_id was used for a different request, and the
        error of a seq_id that cannot take a turn (``SeqOrder.check``): nothing changes then.
        """
        record = self._by_key.get(idem_key) if idem_key else None
        what, code = f"X-Idempotency-Key {idem_key!r}", IDEMPOTENCY_CONFLICT
        model = self.models.get(model_id) if model_id is not None else None
        if record is None and model is not None and seq_id is not None:
            order = model.order
            record = order.seqs.get(seq_id)
            what, code = f"seq_id {seq_id} of model {model_id}", SEQUENCE_CONFLICT
            rejected = order.rejected_before(seq_id) if record is None else None
            if rejected is not None:
                if rejected[0] == fingerprint:
                    raise rejected[1]  # the same bad request again: the same answer
                raise ConflictError(
                    f"{what} was already used by a request that was rejected ({rejected[1].message[:200]}); "
                    f"use the next id ({order.next_seq_id} or later)",
                    code=code,
                )
            if record is None:
                order.check(seq_id)
        if record is None:
            return None
        if record.fingerprint != fingerprint:
            raise ConflictError(
                f"{what} was already used for a different request (request {record.request_id}, "
                f"{record.kind}); a retry must repeat the same body, and a new request needs a new "
                f"{'key' if code == IDEMPOTENCY_CONFLICT else 'seq_id'}",
                code=code,
            )
        return record

    def _forget(self, record: Record) -> None:
        if record.model_id is not None and record.seq_id is not None:
            model = self.models.get(record.model_id)
            if model is not None:
                model.order.forget(record.seq_id, record)

    def _forget_ended_models(self) -> None:
        """Keep the newest ``max_ended_models`` ended models (dicts keep creation order: oldest first)."""
        ended = [m for m in self.models.values() if m.ended]
        for model in ended[: max(0, len(ended) - self.max_ended_models)]:
            del self.models[model.model_id]

    async def _reaper(self, on_tick: Callable[[], Awaitable[None]] | None) -> None:
        interval = max(0.05, min(self.retention_s / 2, self.delivered_retention_s / 2, 30.0))
        while True:
            await asyncio.sleep(interval)
            try:
                self._expire_due()
                self._forget_ended_models()
                if on_tick is not None:
                    await on_tick()
            except Exception:  # keep expiring: a failed tick must not stop the reaper
                log.exception("the expiry task failed once")

    # -------------------------------------------------------------------------------------------- submitting

    def submit(
        self,
        kind: str,
        fn: Callable[[], Any],
        *,
        fingerprint: bytes,
        idem_key: str | None = None,
        model_id: str | None = None,
        seq_id: int | None = None,
        ordered: bool = False,
        on_done: Callable[[Record], None] | None = None,
        on_release: Callable[[], None] | None = None,
    ) -> Record:
        """Queue ``fn`` (run on the device thread); ``ordered`` jobs go through their model's sequence.

        Call ``find_duplicate`` first: this always creates a new record. Raises the error of a seq_id that
        cannot take a turn (behind the sequence, or too far ahead) before creating anything.
        """
        model = self.models.get(model_id) if ordered and model_id is not None else None
        if model is not None and seq_id is not None:
            model.order.check(seq_id)
        record = self._new_record(kind, model_id, fingerprint, idem_key)
        job = _Job(record, fn, on_done, on_release)
        if model is None or seq_id is None:
            self._release(job)
            return record
        record.seq_id = seq_id
        self._run_in_order(model, model.order.add(seq_id, job, record))
        return record

    def skip_seq(self, model_id: str, seq_id: int, fingerprint: bytes, error: BaseException) -> None:
        """A request with ``seq_id`` was rejected before queueing (a 4xx, or a server error): its turn in
        the sequence passes, no work. Without this, the model's later requests would wait for that id until
        the gap timeout."""
        model = self.models.get(model_id)
        if model is None:
            return
        if not isinstance(error, APIError):
            error = InternalServerError(f"unexpected server error: {type(error).__name__}: {error}")
        self._run_in_order(model, model.order.skip(seq_id, fingerprint, error))

    def release_seq(self, model_id: str, seq_id: int) -> None:
        """``POST /api/v1/release_seq``: ``seq_id`` will never be sent, so the model's later requests run
        without waiting for it. Idempotent; an id already received is left alone."""
        model = self.models.get(model_id)
        if model is None:
            raise NotFoundError(f"model_id: unknown model {model_id[:200]!r}; nothing to release")
        self._run_in_order(model, model.order.release(seq_id))

    def _release(self, job: _Job) -> None:
        assert self._queue is not None
        if job.on_release is not None:
            job.on_release()
        self._queue.put_nowait(job)

    def _run_in_order(self, model: ModelState, ready: list[_Job]) -> None:
        """Queue the jobs that are next in ``model``'s order; (re)arm the gap timer for what still waits."""
        for job in ready:
            self._release(job)
        if (ready or not model.order.waiting) and model.gap_timer is not None:
            model.gap_timer.cancel()
            model.gap_timer = None
        if model.order.waiting and model.gap_timer is None:
            assert self._loop is not None
            model.gap_timer = self._loop.call_later(
                self.seq_gap_timeout_s, self._gap_expired, model, model.order.next_seq
            )

    def _gap_expired(self, model: ModelState, missing: int) -> None:
        model.gap_timer = None
        order = model.order
        if order.next_seq != missing or not order.waiting:
            return
        ids = sorted(order.waiting)
        jobs, _ = order.give_up_gap()
        error = BadRequestError(
            f"seq_id {missing} of model {model.model_id} never arrived within {self.seq_gap_timeout_s:g} "
            f"s, so the requests queued behind it (seq_id {ids[0]}..{ids[-1]}) did not run; the model "
            f"continues with seq_id {order.next_seq}"
        )
        for job in jobs:
            self._finish(job.record, error)  # never released: its on_release/on_done do not apply

    def submit_sample(self, job: SampleJob, *, fingerprint: bytes, idem_key: str | None = None) -> Record:
        """Queue a sampling request: it joins the open batch of its (base model, adapter) if there is room."""
        assert self._queue is not None
        record = self._new_record("sample", None, fingerprint, idem_key)
        key = (job.base_model, None if job.adapter_dir is None else str(job.adapter_dir))
        n = job.num_samples
        batch = self._open_batches.get(key)
        if batch is None or batch.sequences + n > self.max_batch_sequences:
            batch = _SampleBatch(key=key, created=self._now())
            self._open_batches[key] = batch
            self._queue.put_nowait(batch)
        batch.items.append((record, job))
        batch.sequences += n
        return record

    # -------------------------------------------------------------------------------------------- the worker

    async def _worker(self) -> None:
        assert self._queue is not None
        queue = self._queue
        pending: _Job | _SampleBatch | None = None  # taken off the queue, next to run
        while True:
            item = pending if pending is not None else await queue.get()
            pending = None
            items = [item]  # and the jobs queued behind it, up to a sample batch: one thread hop for all
            while isinstance(item, _Job) and len(items) < MAX_JOB_GROUP and not queue.empty():
                following = queue.get_nowait()
                if isinstance(following, _SampleBatch):
                    pending = following
                    break
                items.append(following)
            try:
                if isinstance(item, _SampleBatch):
                    await self._run_batch(item)
                else:
                    await self._run_jobs([job for job in items if isinstance(job, _Job)])
            except asyncio.CancelledError:
                self._fail_taken(items, "the server shut down before it ran")
                raise
            except Exception as exc:  # a bug here must not stop the device queue, nor strand what it took
                log.exception("the device worker failed on %r", item)
                self._fail_taken(items, f"the server's device worker failed ({type(exc).__name__})")
            except BaseException:
                self._fail_taken(items, "the server's device worker stopped")
                raise

    def _fail_taken(self, items: list[_Job | _SampleBatch], why: str) -> None:
        """Finish the unfinished records of ``items`` (taken off the queue) with a typed error."""
        error = InternalServerError(f"{why}; the request may not have run: check the run's state, then retry")
        for item in items:
            if isinstance(item, _SampleBatch):
                for record, _ in item.items:
                    self._finish(record, error)
            elif not item.record.done:
                self._job_done(item, error)

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        """Run ``jobs`` in order on the device thread; each finishes on the loop as soon as it has run."""
        assert self._loop is not None
        loop = self._loop

        def run_all() -> None:
            for job in jobs:
                try:
                    outcome: Any = job.fn()
                except BaseException as exc:  # even a BaseException: it fails this job, not the others
                    outcome = exc
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
                    loop.call_soon_threadsafe(self._job_done, job, outcome)

        self.busy = True
        try:
            await loop.run_in_executor(self._executor, run_all)
        finally:
            self.busy = False

    def _job_done(self, job: _Job, outcome: Any) -> None:
        self._finish(job.record, outcome)
        if job.on_done is not None:
            try:
                job.on_done(job.record)
            except Exception:
                log.exception("on_done of request %s failed", job.record.request_id)

    async def _run_batch(self, batch: _SampleBatch) -> None:
        assert self._loop is not None and self.engine is not None
        delay = batch.created + self.sample_window_s - self._now()
        if delay > 0:
            await asyncio.sleep(delay)  # a moment for requests sent together to join
        if self._open_batches.get(batch.key) is batch:
            del self._open_batches[batch.key]
        jobs = [job for _, job in batch.items]
        started = self._now()
        for record, _ in batch.items:
            record.started_at = started  # the device thread is idle: the engine starts the batch now
        self.busy = True
        try:
            outcomes: list[Any] = await self._loop.run_in_executor(self._executor, self.engine.sample, jobs)
            if len(outcomes) != len(jobs):
                raise RuntimeError(f"engine.sample returned {len(outcomes)} results for {len(jobs)} jobs")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # even a BaseException from the engine fails only this batch
            outcomes = [exc] * len(jobs)
        finally:
            self.busy = False
        for (record, _), outcome in zip(batch.items, outcomes, strict=True):
            self._finish(record, outcome)
