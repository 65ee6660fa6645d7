"""Retry policy: which failures are retried, how long to wait, and the one retry budget every request spends.

Pure functions decide (``is_retryable``, ``backoff_delay``, ``retry_after``); a ``RetryBudget`` keeps the
clock. One budget serves a whole operation — a submit's retries, its future's polls, a sample re-submitted
after the server lost its future — and it counts the time since the operation last made progress (an answer
that was not a failure: a 2xx, a ``try_again``, a 408 "still queued"). Waiting out backpressure (429) is not
progress, so a request throttled for longer than the budget fails instead of retrying forever.
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
import time
from collections.abc import Mapping

from . import _wire
from ._errors import APIStatusError, ConfigurationError, RetryBudgetExceededError, error_for_status
from ._wire import Answer, Request

__all__ = (
    "DEFAULT_RETRY_TIMEOUT",
    "RetryBudget",
    "RetryConfig",
    "RetryPolicy",
    "Retryable",
    "backoff_delay",
    "failure",
    "is_retryable",
    "retry_after",
)

DEFAULT_RETRY_TIMEOUT = 300.0  # s, the official client's retry budget (PROTOCOL.md §1.4)
RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx (§1.4)
BACKOFF_BASE = 0.25  # s: first retry after 0.19-0.25 s, doubling ...
BACKOFF_CAP = 10.0  # s: ... up to 10 s (the Stainless layer's cap)
JITTER = 0.25  # the delay is scaled by a factor in [1 - JITTER, 1]
RETRY_AFTER_MAX = 60.0  # s: a Retry-After beyond this is ignored, as in the official client


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one client retries: the budget (seconds without progress), backoff, and an optional attempt cap."""

    timeout: float = DEFAULT_RETRY_TIMEOUT
    base: float = BACKOFF_BASE
    cap: float = BACKOFF_CAP
    jitter: float = JITTER
    max_retries: int | None = None  # None: the budget alone decides
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.timeout < 0 or self.base < 0 or self.cap < 0 or not 0 <= self.jitter <= 1:
            raise ConfigurationError(
                f"retry settings must be non-negative (jitter in [0, 1]); got timeout={self.timeout}, "
                f"base={self.base}, cap={self.cap}, jitter={self.jitter}"
            )
        if self.max_retries is not None and self.max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {self.max_retries}")

    def budget(self, what: str) -> RetryBudget:
        return RetryBudget(self, what)


def is_retryable(status: int, headers: Mapping[str, str]) -> bool:
    """408, 409, 429 and 5xx are retried, unless the server's ``x-should-retry`` says otherwise."""
    should = (headers.get(_wire.SHOULD_RETRY) or "").lower()
    if should in ("true", "false"):
        return should == "true"
    return status in RETRY_STATUSES or status >= 500


class Retryable(Exception):
    """An error answer to retry: what failed, the server's Retry-After (if any), the status."""

    def __init__(self, failure: str, hint: float | None, status: int | None) -> None:
        super().__init__(failure)
        self.failure = failure
        self.hint = hint
        self.status = status


def failure(request: Request, answer: Answer) -> Exception:
    """The exception for an error answer: ``Retryable`` or the final ``APIStatusError``."""
    status = answer.status
    message, code = _wire.parse_error_body(answer.payload, answer.content_type)
    if is_retryable(status, answer.headers):
        return Retryable(f"HTTP {status} ({message})", retry_after(answer.headers), status)
    cls: type[APIStatusError] = error_for_status(status, code)
    return cls(f"{request.method} {request.path}: HTTP {status}: {message}", status=status, code=code)


def backoff_delay(attempt: int, policy: RetryPolicy | None = None) -> float:
    """Exponential backoff with jitter: ``min(base * 2**attempt, cap)`` times a factor in [0.75, 1]."""
    p = policy or _DEFAULT
    return min(p.base * 2.0 ** min(attempt, 64), p.cap) * random.uniform(1.0 - p.jitter, 1.0)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), if within (0, 60] s."""
    value: float | None = None
    if (ms := headers.get(_wire.RETRY_AFTER_MS)) is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = None
    if value is None and (raw := headers.get(_wire.RETRY_AFTER)) is not None:
        try:
            value = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            value = when.timestamp() - time.time()
    if value is None or not 0.0 < value <= RETRY_AFTER_MAX:
        return None
    return value


_DEFAULT = RetryPolicy()


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """The official SDK's sampling retry settings (``hpcai.lib.retry_handler.RetryConfig``), same defaults.

    Given as ``retry_config=`` to ``create_sampling_client`` / ``save_weights_and_get_sampling_client``, it
    governs that SamplingClient: at most ``max_connections`` samples on the wire at once (a
    ``FixedConcurrencyController`` of that size, unless a ``concurrency_controller`` is given); a sample fails
    after ``progress_timeout`` seconds without progress (its retry budget); retries wait
    ``retry_delay_base * 2**n`` up to ``retry_delay_max`` seconds, less up to ``jitter_factor`` of it;
    ``enable_retry_logic=False`` makes the first failure final. ``retryable_exceptions`` is kept for
    compatibility: this client retries connection failures and timeouts (what the official default lists)
    and decides on HTTP answers by status, whatever classes it names.
    """

    max_connections: int = 1000  # the official DEFAULT_CONNECTION_LIMITS.max_connections
    progress_timeout: float = 30 * 60  # s: the official "very long straggler" bound
    retry_delay_base: float = 0.5  # s, the official INITIAL_RETRY_DELAY
    retry_delay_max: float = 10.0  # s, the official MAX_RETRY_DELAY
    jitter_factor: float = 0.25
    enable_retry_logic: bool = True
    retryable_exceptions: tuple[type[Exception], ...] = (TimeoutError, ConnectionError)

    def __post_init__(self) -> None:
        if self.max_connections <= 0:
            raise ConfigurationError(f"max_connections must be positive, got {self.max_connections}")
        self.policy()  # the other fields are checked there

    def policy(self) -> RetryPolicy:
        """The retry policy these settings describe."""
        return RetryPolicy(
            timeout=self.progress_timeout,
            base=self.retry_delay_base,
            cap=self.retry_delay_max,
            jitter=self.jitter_factor,
            enabled=self.enable_retry_logic,
        )


class RetryBudget:
    """The retry clock of one operation: time since its last progress, attempts, and the last failure seen."""

    __slots__ = ("_since", "attempts", "failures", "last_failure", "last_status", "policy", "started", "what")

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.started = self._since = time.monotonic()
        self.attempts = 0  # failures since the last progress
        self.failures = 0  # failures in all
        self.last_failure: str | None = None
        self.last_status: int | None = None

    def progress(self) -> None:
        """The operation moved on (an answer that was not a failure): the clock starts again."""
        self._since = time.monotonic()
        self.attempts = 0

    def elapsed(self) -> float:
        return time.monotonic() - self._since

    def failed(self, failure: str, status: int | None = None, hint: float | None = None) -> float:
        """Record a retryable failure: the delay before the next attempt, or raise if the budget is spent."""
        self.attempts += 1
        self.failures += 1
        self.last_failure, self.last_status = failure, status if status is not None else self.last_status
        elapsed = self.elapsed()
        p = self.policy
        capped = p.max_retries is not None and self.attempts > p.max_retries
        if not p.enabled or capped or elapsed >= p.timeout:
            raise self.exceeded()
        delay = hint if hint is not None else backoff_delay(self.attempts - 1, p)
        return max(0.0, min(delay, p.timeout - elapsed))

    def throttled(self, failure: str, status: int | None) -> None:
        """Backpressure (a sampling 429): the wait is spent from the budget, but it neither grows the backoff
        nor counts against ``max_retries``; raise when the budget is spent."""
        self.failures += 1
        self.last_failure, self.last_status = failure, status
        if not self.policy.enabled or self.elapsed() >= self.policy.timeout:
            raise self.exceeded()

    def remaining(self) -> float:
        return max(0.0, self.policy.timeout - self.elapsed())

    def exceeded(self, request_id: str | None = None) -> RetryBudgetExceededError:
        """The error that ends the operation: what it was, how long it waited, the last status and failure."""
        status = f"last status {self.last_status}" if self.last_status is not None else "no answer"
        limit = f"retry budget {self.policy.timeout:g} s"
        if self.policy.max_retries is not None:
            limit += f", max_retries {self.policy.max_retries}"
        if not self.policy.enabled:
            limit = "retries disabled"
        return RetryBudgetExceededError(
            f"{self.what}: gave up after {self.failures} failed attempts, {self.elapsed():.1f} s without "
            f"progress ({time.monotonic() - self.started:.1f} s in all; {limit}); {status}; "
            f"last failure: {self.last_failure}",
            status=self.last_status,
            request_id=request_id,
        )
