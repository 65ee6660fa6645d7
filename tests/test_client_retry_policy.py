"""The retry policy alone (hpcai_async._retry): which answers are retried, and the one budget's clock."""

from __future__ import annotations

import time

import pytest

from hpcai_async import ConfigurationError, RetryBudgetExceededError, RetryConfig
from hpcai_async._retry import RetryPolicy, backoff_delay, is_retryable


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (408, {}, True),
        (409, {}, True),
        (429, {}, True),
        (500, {}, True),
        (503, {}, True),
        (400, {}, False),
        (404, {}, False),
        (409, {"x-should-retry": "false"}, False),  # a typed conflict (sequence / idempotency)
        (400, {"x-should-retry": "true"}, True),
    ],
)
def test_which_answers_are_retried(status: int, headers: dict[str, str], expected: bool) -> None:
    assert is_retryable(status, headers) is expected


def test_the_budget_runs_from_the_last_progress_and_names_what_failed() -> None:
    budget = RetryPolicy(timeout=0.2, base=0.0).budget("POST optim_step")
    assert budget.failed("HTTP 503 (busy)", 503) == 0.0
    time.sleep(0.15)
    budget.progress()  # e.g. a try_again: the clock starts again
    time.sleep(0.1)
    budget.failed("HTTP 503 (busy)", 503)  # 0.1 s since the progress: within the budget
    time.sleep(0.12)
    with pytest.raises(RetryBudgetExceededError) as info:
        budget.failed("ClientConnectionError: reset", None)
    text = str(info.value)
    assert text.startswith("POST optim_step: gave up after 3 failed attempts")
    assert "without progress" in text and "last status 503" in text and "reset" in text
    assert info.value.status == 503


def test_throttling_spends_the_budget_without_growing_the_backoff() -> None:
    budget = RetryPolicy(timeout=0.1, base=1.0, cap=1.0, jitter=0.0).budget("asample")
    for _ in range(5):
        budget.throttled("HTTP 429", 429)
    assert budget.failed("HTTP 503", 503) == pytest.approx(0.1, abs=0.02)  # first backoff, capped by budget
    time.sleep(0.11)
    with pytest.raises(RetryBudgetExceededError, match="last status 429"):
        budget.throttled("HTTP 429", 429)


def test_max_retries_and_disabled_retries_end_at_once() -> None:
    capped = RetryPolicy(max_retries=2, base=0.0).budget("x")
    capped.failed("a")
    capped.failed("b")
    with pytest.raises(RetryBudgetExceededError, match="max_retries 2"):
        capped.failed("c")
    with pytest.raises(RetryBudgetExceededError, match="retries disabled"):
        RetryPolicy(enabled=False).budget("y").failed("a")


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    policy = RetryPolicy(base=0.5, cap=4.0, jitter=0.25)
    assert all(0.375 <= backoff_delay(0, policy) <= 0.5 for _ in range(20))
    assert all(3.0 <= backoff_delay(50, policy) <= 4.0 for _ in range(20))


def test_retry_config_has_the_official_defaults_and_checks_its_fields() -> None:
    config = RetryConfig()
    assert (config.max_connections, config.progress_timeout) == (1000, 1800)
    assert (config.retry_delay_base, config.retry_delay_max, config.jitter_factor) == (0.5, 10.0, 0.25)
    assert config.enable_retry_logic is True
    policy = config.policy()
    assert (policy.timeout, policy.base, policy.cap, policy.jitter) == (1800, 0.5, 10.0, 0.25)
    with pytest.raises(ConfigurationError, match="max_connections"):
        RetryConfig(max_connections=0)
    with pytest.raises(ConfigurationError, match="jitter"):
        RetryConfig(jitter_factor=2.0)
