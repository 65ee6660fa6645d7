"""One exception tree for the client and the local server.

    HpcaiError
    ├── ConfigurationError        (ValueError)    bad arguments or environment, raised before any request
    ├── UnsupportedFeatureError   (NotImplementedError)  the server lacks a feature (nothing was sent)
    ├── APIError                                  anything the service or the transport said
    │   ├── APIConnectionError    (OSError)       could not reach the service, or the connection broke
    │   │   └── APITimeoutError   (TimeoutError)  a request or a wait ran past its time
    │   ├── RetryBudgetExceededError               retried until the configured total time ran out
    │   ├── RequestFailedError                    a submitted job failed on the server
    │   └── APIStatusError                        an HTTP answer with an error status
    │       ├── BadRequestError           400     (ValueError)
    │       ├── AuthenticationError       401
    │       ├── PermissionDeniedError     403
    │       ├── NotFoundError             404     (LookupError)
    │       ├── ConflictError             409
    │       │   ├── SequenceConflictError         a seq_id of the run was used already (not retried)
    │       │   └── IdempotencyConflictError      an idempotency key came back with another body (not retried)
    │       ├── GoneError                 410     a future expired or was dropped
    │       ├── UnprocessableEntityError  422     (ValueError)
    │       ├── RateLimitError            429
    │       └── InternalServerError       5xx

Every exception carries plain fields only (``status``, ``code``, ``message``, ``request_id``), so it
pickles and crosses threads and processes. The local server answers with the same table: an exception's
``status`` class attribute is its HTTP status, and ``error_for_status`` maps a status (and the error body's
``code``, for the typed conflicts) back to a class.
"""

from __future__ import annotations

__all__ = (
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "GoneError",
    "HpcaiError",
    "IdempotencyConflictError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "RetryBudgetExceededError",
    "SequenceConflictError",
    "UnprocessableEntityError",
    "UnsupportedFeatureError",
    "error_for_status",
)


class HpcaiError(Exception):
    """Root of every error raised by hpcai_async."""


class ConfigurationError(HpcaiError, ValueError):
    """Bad arguments or environment, found before anything was sent."""


class UnsupportedFeatureError(HpcaiError, NotImplementedError):
    """The server does not advertise a feature the call needs (``get_server_capabilities``); nothing was sent.

    ``feature`` names it, as the server's capabilities list would."""

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(message)
        self.feature = feature

    def __reduce__(self) -> tuple[type[UnsupportedFeatureError], tuple[str, str]]:
        return (type(self), (self.feature, str(self)))


class APIError(HpcaiError):
    """The service or the transport reported a problem."""

    status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.code = code
        self.request_id = request_id

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only fields do not survive the default pickling of exceptions
        return (_rebuild, (type(self), self.message, self.status, self.code, self.request_id))

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.message}{where}"


def _rebuild(
    cls: type[APIError], message: str, status: int | None, code: str | None, request_id: str | None
) -> APIError:
    return cls(message, status=status, code=code, request_id=request_id)


class APIConnectionError(APIError, OSError):
    """The service could not be reached, or the connection broke mid-request."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """A request, or a wait for a result, ran past its time limit."""


class RetryBudgetExceededError(APIError):
    """Retryable failures went on for longer than the client's total retry budget."""


class RequestFailedError(APIError):
    """A submitted job ran on the server and failed; ``message`` is the server's own."""


class APIStatusError(APIError):
    """The service answered with an HTTP error status."""


class BadRequestError(APIStatusError, ValueError):
    status = 400


class AuthenticationError(APIStatusError):
    status = 401


class PermissionDeniedError(APIStatusError):
    status = 403


class NotFoundError(APIStatusError, LookupError):
    status = 404


class ConflictError(APIStatusError):
    status = 409


class SequenceConflictError(ConflictError):
    """The run already had a request with this seq_id (another client on the same run, or a replay).

    Retrying cannot help: the server ran the first one. A client attached to a run with
    ``ServiceClient.create_training_client(model_id)`` continues the run's sequence and never causes this.
    """


class IdempotencyConflictError(ConflictError):
    """An idempotency key was sent again with a different body; the server keeps the first (not retried)."""


class GoneError(APIStatusError):
    status = 410


class UnprocessableEntityError(APIStatusError, ValueError):
    status = 422


class RateLimitError(APIStatusError):
    status = 429


class InternalServerError(APIStatusError):
    status = 500


_BY_STATUS: dict[int, type[APIStatusError]] = {
    cls.status: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        GoneError,
        UnprocessableEntityError,
        RateLimitError,
    )
}


_BY_CODE: dict[tuple[int, str], type[APIStatusError]] = {
    (409, "sequence_conflict"): SequenceConflictError,
    (409, "idempotency_conflict"): IdempotencyConflictError,
}


def error_for_status(status: int, code: str | None = None) -> type[APIStatusError]:
    """The exception class for an HTTP error status (PROTOCOL.md §1.4) and the error body's ``code``."""
    if code is not None and (cls := _BY_CODE.get((status, code))) is not None:
        return cls
    if status >= 500:
        return InternalServerError
    return _BY_STATUS.get(status, APIStatusError)
