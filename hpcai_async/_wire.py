"""What client and local server share about the wire: media types, codecs, headers, error bodies, paths.

Every rule here is written once and used by both sides (the server imports it from the client package, never
the other way round):

* media types and the codecs: JSON for everyone, MessagePack (tensors as raw little-endian bytes) where the
  server lists ``"msgpack"``; one reusable msgspec encoder per format and one decoder per (type, format);
* header names (PROTOCOL.md §1, §3, §4), our ``inline_result`` extension's wait header and its cap, and
  the ``queue_duration`` extension's header;
* the error body ``{"error": <exception class>, "message": ..., "code": <machine code, optional>}`` and the
  status <-> exception table that maps it back (``_errors`` holds the classes);
* checkpoint paths: ``hpcai://{run}/{weights|sampler_weights|training|sampler}/{checkpoint}``, and the same
  with ``tinker://`` (the Tinker SDK's scheme, same meaning).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal, NamedTuple, TypeVar

import msgspec

from . import _tensor
from ._errors import APIError, APIStatusError, ConfigurationError, HpcaiError, error_for_status

__all__ = (
    "ACCEPT_MSGPACK",
    "Answer",
    "CHECKPOINT_SCHEMES",
    "INLINE_WAIT_HEADER",
    "INLINE_WAIT_MAX",
    "JSON",
    "MSGPACK",
    "MSGPACK_TYPES",
    "ParsedCheckpointPath",
    "QUEUE_DURATION_MS",
    "Request",
    "checkpoint_id_for",
    "checkpoint_name",
    "checkpoint_path_for",
    "auto_key",
    "decode",
    "decoder",
    "encode",
    "error_body",
    "error_name",
    "inline_wait",
    "is_checkpoint_name",
    "is_checkpoint_path",
    "is_msgpack",
    "parse_checkpoint_path",
    "parse_error_body",
    "queue_duration",
    "shorten",
    "status_for_error",
)

T = TypeVar("T")

# ------------------------------------------------------------------------------------------- media types

JSON = "application/json"
MSGPACK = "application/msgpack"
# the spellings of MessagePack a request may carry (the registered one and the two in common use)
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
ACCEPT_MSGPACK = f"{MSGPACK}, {JSON};q=0.9"
GZIP = "application/gzip"  # checkpoint archives

# ------------------------------------------------------------------------------------------- headers

API_KEY = "X-API-Key"
IDEMPOTENCY_KEY = "X-Idempotency-Key"
SHOULD_RETRY = "x-should-retry"  # "true" / "false" overrides the status rule (PROTOCOL.md §1.4)
RETRY_AFTER = "retry-after"
RETRY_AFTER_MS = "retry-after-ms"
REQUEST_TYPE = "X-HpcAI-Request-Type"
REQUEST_ITERATION = "X-HpcAI-Request-Iteration"
ROUNDTRIP = "X-HpcAI-Create-Promise-Roundtrip-Time"
SAMPLING_BACKPRESSURE = "X-HpcAI-Sampling-Backpressure"
# "inline_result": seconds a submit may be held so that its answer carries the result (instant jobs:
# NullEngine, a sample batch window); longer jobs are long-polled as usual. The cap keeps a held submit quick.
INLINE_WAIT_HEADER = "X-HpcAI-Async-Inline-Wait"
INLINE_WAIT_MAX = 0.05  # s
INLINE_WAIT_SUBMIT = 0.01  # s: what a client asks for one submit ...
INLINE_WAIT_BATCH = INLINE_WAIT_MAX  # ... and for all the results of a batch
# "queue_duration": on an answer that carries a sample's result (a poll's, an inline result's, a batch
# item's), the milliseconds the job waited in the server's queue before the engine started it.
QUEUE_DURATION_MS = "X-Queue-Duration-Ms"


def inline_wait(value: str | None) -> float:
    """The wait a request's inline-wait header asks for, within [0, INLINE_WAIT_MAX] (0 if absent or bad)."""
    try:
        wait = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return min(max(wait, 0.0), INLINE_WAIT_MAX) if wait == wait else 0.0  # NaN -> 0


def queue_duration(headers: Mapping[str, str]) -> float | None:
    """The queue duration (seconds) an answer's ``X-Queue-Duration-Ms`` header reports, or None."""
    raw = headers.get(QUEUE_DURATION_MS)
    try:
        ms = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return ms / 1000.0 if math.isfinite(ms) and ms >= 0 else None


# ------------------------------------------------------------------------------------------- codecs

_JSON_ENCODER = msgspec.json.Encoder(enc_hook=_tensor.json_enc_hook)
_MSGPACK_ENCODER = msgspec.msgpack.Encoder(enc_hook=_tensor.msgpack_enc_hook)
_DECODERS: dict[tuple[Any, bool], msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]] = {}


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # the version and variant bits of a UUID ...
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)  # ... set for version 4, RFC 4122 variant


def auto_key() -> str:
    """A fresh idempotency key for a request with none of its own (the official client's form)."""
    # a random version-4 UUID, without a system call per key (uuid4 reads os.urandom) or a UUID object
    h = f"{random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET:032x}"
    return f"stainless-python-retry-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_msgpack(content_type: str) -> bool:
    """Whether a body of ``content_type`` is MessagePack (else it is read as JSON)."""
    return content_type in MSGPACK_TYPES


def encode(body: Any, msgpack: bool) -> tuple[bytes, str]:
    """``body`` as MessagePack or JSON, with its content type."""
    if msgpack:
        return _MSGPACK_ENCODER.encode(body), MSGPACK
    return _JSON_ENCODER.encode(body), JSON


def decoder(tp: Any, msgpack: bool) -> msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]:
    """The reusable decoder of ``tp`` for one format (made once per type and format)."""
    dec = _DECODERS.get((tp, msgpack))
    if dec is None:
        dec = _DECODERS[tp, msgpack] = msgspec.msgpack.Decoder(tp) if msgpack else msgspec.json.Decoder(tp)
    return dec


def decode(payload: bytes, content_type: str, tp: type[T]) -> T:
    """A response body (JSON or MessagePack, by its content type) decoded into ``tp``; ``APIError`` if it
    is not one."""
    try:
        result: T = decoder(tp, is_msgpack(content_type)).decode(payload)
    except msgspec.DecodeError as exc:
        raise APIError(f"unexpected response from the server for {tp.__name__}: {exc}") from None
    return result


HOSTED_LOSSES: Final = ("cross_entropy", "importance_sampling", "ppo")  # PROTOCOL.md §5.3


def loss_features(loss_fn: str, loss_fn_config: Mapping[str, float] | None) -> tuple[str, ...]:
    """The server features a forward pass with ``loss_fn`` and ``loss_fn_config`` needs: ``loss:<name>``
    for a loss beyond the hosted service's three, ``loss_fn_config`` for a non-empty config."""
    needs = () if loss_fn in HOSTED_LOSSES else (f"loss:{loss_fn}",)
    return (*needs, "loss_fn_config") if loss_fn_config else needs


def shorten(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages that quote what a caller sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# ------------------------------------------------------------------------------------------- errors


def error_name(status: int) -> str:
    """The ``error`` field for an answer of ``status``: the exception class the client will raise."""
    return error_for_status(status).__name__


_STATUS_OF: dict[str, int] = {
    error_name(status): status for status in (400, 401, 403, 404, 409, 410, 413, 422, 429)
}
_STATUS_OF.pop(APIStatusError.__name__, None)  # the fallback class names no single status


def status_for_error(error: str) -> int:
    """The HTTP status of an error body's ``error`` class name (500 if unknown): the table read backwards."""
    return _STATUS_OF.get(error, 500)


def error_body(error: str, message: str, code: str | None = None) -> dict[str, str]:
    """The error answer's body: the exception class, the message, and a machine-readable code if any."""
    body = {"error": error, "message": message}
    if code is not None:
        body["code"] = code
    return body


def parse_error_body(payload: bytes, content_type: str) -> tuple[str, str | None]:
    """The message and error code of an error body, whatever its shape (ours, the hosted service's, text)."""
    try:
        body = msgspec.msgpack.decode(payload) if is_msgpack(content_type) else msgspec.json.decode(payload)
    except msgspec.DecodeError:
        text = payload[:500].decode("utf-8", "replace").strip()
        return text or "(empty body)", None
    if isinstance(body, dict):
        code = next((v for f in ("code", "error") if isinstance(v := body.get(f), str)), None)
        for field in ("message", "detail", "error"):
            if (value := body.get(field)) is not None:
                return (value if isinstance(value, str) else msgspec.json.encode(value).decode()), code
    return msgspec.json.encode(body).decode()[:500], None


# ------------------------------------------------------------------------------------------- checkpoint paths

CHECKPOINT_SCHEMES = ("hpcai://", "tinker://")
# Both spellings of the checkpoint kind: the hosted service's (weights / sampler_weights, PROTOCOL.md §5.8)
# and the official SDK's parser's (training / sampler).
_KINDS: dict[str, Literal["training", "sampler"]] = {
    "weights": "training",
    "training": "training",
    "sampler_weights": "sampler",
    "sampler": "sampler",
}
_SEGMENTS = {"training": "weights", "sampler": "sampler_weights"}  # the segment the hosted service writes
# What the local server creates (and so accepts): ids safe as one folder name.
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_EXAMPLE = "hpcai://<run>/weights/<name>_training or hpcai://<run>/sampler_weights/<name>_sampler"


class ParsedCheckpointPath(NamedTuple):
    training_run_id: str
    checkpoint_type: Literal["training", "sampler"]
    checkpoint_id: str


def is_checkpoint_path(path: object) -> bool:
    """Whether ``path`` has a checkpoint scheme (``hpcai://`` or ``tinker://``); the rest is not checked."""
    return isinstance(path, str) and path.startswith(CHECKPOINT_SCHEMES)


def parse_checkpoint_path(
    path: object,
    *,
    field: str | None = None,
    strict: bool = False,
    error: type[HpcaiError] = ConfigurationError,
) -> ParsedCheckpointPath:
    """Split ``{hpcai|tinker}://{run}/{kind}/{checkpoint_id}`` into its parts, or raise ``error``.

    ``strict`` (the local server) also requires ids it could have made: a run id of letters, digits, ``_``
    and ``-``, a checkpoint id without ``/`` or ``..``. Otherwise (the client, which must accept the hosted
    service's ids) any non-empty parts do, and a trailing ``.tar.gz`` is dropped. ``field`` names the
    request field in the message.
    """
    where = f"{field}: " if field else ""
    scheme = next((s for s in CHECKPOINT_SCHEMES if isinstance(path, str) and path.startswith(s)), None)
    parts = path[len(scheme) :].split("/", 2) if scheme is not None and isinstance(path, str) else []
    if not strict and len(parts) == 3:
        parts[2] = parts[2].removesuffix(".tar.gz")
    if len(parts) != 3 or not all(parts) or parts[1] not in _KINDS:
        raise error(f"{where}not a checkpoint path: {shorten(path)} (expected {_EXAMPLE})")
    run_id, segment, ckpt = parts
    if strict and (not _RUN_ID_RE.fullmatch(run_id) or not _NAME_RE.fullmatch(ckpt) or ".." in ckpt):
        raise error(
            f"{where}not a checkpoint path of this server: {shorten(path)} (run ids are letters, digits, "
            f"'_' and '-'; checkpoint ids have no '/' or '..'; expected {_EXAMPLE})"
        )
    return ParsedCheckpointPath(run_id, _KINDS[segment], ckpt)


def wire_path(path: str) -> str:
    """``path`` as the hosted service accepts it: a ``tinker://`` path becomes the same ``hpcai://`` one (the
    client sends only the hosted scheme; the local server reads both)."""
    return "hpcai://" + path.removeprefix("tinker://") if path.startswith("tinker://") else path


def checkpoint_path_for(run_id: str, checkpoint_id: str, kind: str, scheme: str = "hpcai://") -> str:
    """The path the hosted service writes for a checkpoint: ``hpcai://{run}/{weights|sampler_weights}/{id}``."""
    return f"{scheme}{run_id}/{_SEGMENTS[kind]}/{checkpoint_id}"


def is_checkpoint_name(value: str) -> bool:
    """Whether ``value`` is a bare checkpoint name (``step-4``), not a path: it has no ``scheme://``.

    ``load_state("step-4")`` resolves such a name among its own run's checkpoints; anything with a scheme
    is a path and goes to the server as it is (which refuses what it cannot read)."""
    return "://" not in value


def checkpoint_id_for(name: str, kind: str) -> str:
    """``step-4`` + ``training`` -> ``step-4_training``: the id the hosted service gives a save (§5.8)."""
    return f"{name}_{kind}"


def checkpoint_name(checkpoint_id: str, kind: str) -> str:
    """The name a checkpoint was saved under: ``checkpoint_id_for`` read backwards (``step-4_training`` ->
    ``step-4``); Tinker's ids (``weights/step-4``) lose their segment; any other id is its own name."""
    if "/" in checkpoint_id:
        return checkpoint_id.rsplit("/", 1)[1]
    return checkpoint_id.removesuffix(f"_{kind}") or checkpoint_id


# ------------------------------------------------------------------------------------------- exchanges


class Request(NamedTuple):
    """One HTTP request as plain data: what the client's ``send`` seam takes (no retries at that level)."""

    method: str
    path: str  # under the API root, e.g. "forward_backward"
    data: bytes | None = None
    headers: Mapping[str, str] = {}
    params: Mapping[str, str | int] | None = None
    read_timeout: float | None = None  # seconds for each read; None: the session's
    # Where a 2xx body goes, block by block, instead of into ``Answer.payload`` (streamed downloads):
    # ``sink(block, content_length)``, first with an empty block each time a body starts.
    sink: Callable[[bytes, int | None], Awaitable[None]] | None = None


class Answer(NamedTuple):
    """An HTTP answer: of a request of its own, or of one request in a batch."""

    status: int
    payload: bytes
    content_type: str
    headers: Mapping[str, str]
