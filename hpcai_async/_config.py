"""ServiceClient's options: the environment's defaults, their checks, and the Transport they make."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ._errors import ConfigurationError
from ._http import DEFAULT_BASE_URL, Transport
from ._retry import RetryPolicy

__all__ = ("make_transport",)


def make_transport(
    base_url: str | None,
    api_key: str | None,
    *,
    timeout: float | None,
    max_retries: int | None,
    default_headers: Mapping[str, str] | None,
    default_query: Mapping[str, str | int] | None,
    http_client: object | None,
    connection_limit: int,
    retry_timeout: float,
    request_timeout: float,
    poll_timeout: float,
) -> Transport:
    """The Transport of a ``ServiceClient(...)``: ``base_url`` and ``api_key`` default to ``HPCAI_BASE_URL``
    and ``HPCAI_API_KEY``; a bad option is a ConfigurationError that names it (see ServiceClient)."""
    base_url = base_url or os.environ.get("HPCAI_BASE_URL") or DEFAULT_BASE_URL
    api_key = api_key or os.environ.get("HPCAI_API_KEY")
    if not api_key:
        raise ConfigurationError("no API key: pass ServiceClient(api_key=...) or set HPCAI_API_KEY")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigurationError(f"base_url must start with http:// or https://, got {base_url!r}")
    if connection_limit < 1:
        raise ConfigurationError(f"connection_limit must be at least 1, got {connection_limit}")
    if http_client is not None:
        raise ConfigurationError(
            "http_client: hpcai_async has its own aiohttp session, not an httpx client; use "
            "connection_limit=, timeout=, default_headers= instead"
        )
    if timeout is not None:  # the official keyword: a number, or an httpx.Timeout (its read timeout)
        timeout = getattr(timeout, "read", timeout)
        request_timeout = float(timeout) if timeout is not None else request_timeout
    if retry_timeout < 0 or request_timeout <= 0 or poll_timeout <= 0:
        raise ConfigurationError(
            "retry_timeout must be >= 0, request_timeout (timeout) and poll_timeout > 0; got "
            f"{retry_timeout}, {request_timeout}, {poll_timeout}"
        )
    return Transport(
        base_url,
        api_key,
        connection_limit=connection_limit,
        retry=RetryPolicy(timeout=retry_timeout, max_retries=max_retries),
        request_timeout=request_timeout,
        poll_timeout=poll_timeout,
        headers=default_headers,
        params=default_query,
    )
