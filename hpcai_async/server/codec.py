"""How the server reads and writes bodies: JSON or MessagePack by Content-Type and Accept, and error answers.

The codecs, media types, header names, error-body shape and status table are ``hpcai_async._wire``'s, shared
with the client; this module adds what only the server says. Requests are decoded with the shared msgspec
structs (``hpcai_async.types``), so the bodies the official SDK sends are accepted as they are: ``null``
inside nested objects, integers for floats, ``type`` present or absent, unknown fields ignored. A body with
``Content-Type: application/msgpack`` is read as MessagePack (tensors as raw little-endian bytes); an answer
is MessagePack when the request's ``Accept`` names ``application/msgpack``, else JSON. A body that does not
decode is a 400 naming the field (and the allowed values of an enum), or saying that it is in the other
format. Every error answer is ``{"error": <exception class>, "message": <what was wrong and how to fix it>}``
(plus ``code`` where there is one) with the status of ``hpcai_async._errors``; a message is cut to
MESSAGE_MAX characters, however long a value it quoted.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, TypeVar, get_args

import msgspec
from aiohttp import web

from .. import _wire, types
from .._errors import APIError, BadRequestError, ConflictError

__all__ = ("MESSAGE_MAX", "Codec", "clip")

log = logging.getLogger("hpcai_async.server")

T = TypeVar("T")

_PATH_RE = re.compile(r" - at `\$\.?(.*)`$")
MESSAGE_MAX = 1000  # characters of an error message: a few quoted values (_wire.shorten) and the advice
_NOT_RETRIED = (ConflictError,)  # the same request conflicts however often it is retried
_MSGPACK_MAP = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}  # the first byte of a MessagePack map


def _friendly(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Expected `int`, got `str` - at `$.a.b[0]``` as ``a.b[0]: expected `int`, got `str```."""
    text = str(exc)
    match = _PATH_RE.search(text)
    where = ""
    if match:
        where = match.group(1)
        text = text[: match.start()]
    text = text[:1].lower() + text[1:]
    if text.startswith("object missing required field"):
        text = "missing required field" + text[len("object missing required field") :]
    leaf = where.rsplit(".", 1)[-1]
    if text.startswith("invalid") and leaf in _CHOICES and (leaf != "type" or ".chunks[" in where):
        text += f"; use one of {', '.join(_CHOICES[leaf])}"
    if where:
        return f"invalid request body: {where}: {text}"
    return f"invalid request body: {text}"


# the enum fields whose decode errors list the allowed values
_CHOICES: dict[str, tuple[str, ...]] = {
    "loss_fn": get_args(types.LossFnType),
    "dtype": get_args(types.TensorDtype),
    "grad_accumulation_normalization": tuple(m.value for m in types.GradAccNormalization),
    "type": tuple(c.__struct_config__.tag for c in get_args(types.ModelInputChunk)),
}


class _SeqOnly(msgspec.Struct):
    """Just the ordering fields of a per-model request (read when the rest of the body is invalid)."""

    model_id: str
    seq_id: int | msgspec.UnsetType = msgspec.UNSET


def clip(message: str) -> str:
    """An error message cut to MESSAGE_MAX characters: whatever it quoted, the answer stays small."""
    if len(message) <= MESSAGE_MAX:
        return message
    return f"{message[: MESSAGE_MAX - 40]}... ({len(message) - MESSAGE_MAX + 40} more characters cut)"


@dataclasses.dataclass(frozen=True, slots=True)
class Codec:
    """How one request is read and answered: MessagePack or JSON, by its Content-Type and its Accept."""

    msgpack_in: bool = False
    msgpack_out: bool = False

    @classmethod
    def of(cls, request: web.BaseRequest) -> Codec:
        accept = request.headers.get("Accept", "")
        return cls(_wire.is_msgpack(request.content_type), _wire.MSGPACK in accept)

    def decode(self, raw: bytes, struct: type[T]) -> T:
        """The body as ``struct``; 400 naming the field (or the format) when it is not one."""
        kind = "MessagePack" if self.msgpack_in else "JSON"
        if not raw:
            raise BadRequestError(f"the request body is empty; send a {kind} object ({struct.__name__})")
        try:
            return _wire.decoder(struct, self.msgpack_in).decode(raw)  # type: ignore[no-any-return]
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            mismatch = self._format_mismatch(raw)
            if mismatch:
                raise BadRequestError(mismatch) from None
            if isinstance(exc, msgspec.ValidationError):
                raise BadRequestError(_friendly(exc)) from None
            media = _wire.MSGPACK if self.msgpack_in else _wire.JSON
            raise BadRequestError(
                f"the request body is not valid {kind} ({exc}); send Content-Type: {media} with a {kind} "
                "object"
            ) from None

    def _format_mismatch(self, raw: bytes) -> str:
        """What to say when a body that failed to decode is plainly in the other format ('' if not)."""
        if self.msgpack_in and raw.lstrip()[:1] in (b"{", b"["):
            return (
                "the request body is JSON but its Content-Type says MessagePack; send Content-Type: "
                f"{_wire.JSON} with a JSON body, or encode the body as MessagePack"
            )
        if not self.msgpack_in and raw[0] in _MSGPACK_MAP:
            return (
                "the request body is MessagePack but its Content-Type is not; send Content-Type: "
                f"{_wire.MSGPACK} with a MessagePack body, or encode the body as JSON"
            )
        return ""

    def seq_of(self, raw: bytes) -> _SeqOnly | None:
        """The model_id and seq_id of a body that did not decode as a whole, if they can still be read."""
        try:
            return _wire.decoder(_SeqOnly, self.msgpack_in).decode(raw)  # type: ignore[no-any-return]
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None

    def encode(self, obj: Any) -> bytes:
        return _wire.encode(obj, self.msgpack_out)[0]

    def reply(self, obj: Any, status: int = 200) -> web.Response:
        body, content_type = _wire.encode(obj, self.msgpack_out)
        return web.Response(body=body, status=status, content_type=content_type)

    def error_reply(self, status: int, message: str, code: str | None = None) -> web.Response:
        """An error answer of ``status``: the exception class the client will raise, and the message."""
        return self.reply(_wire.error_body(_wire.error_name(status), clip(message), code), status)

    def error(self, exc: BaseException, where: str = "") -> web.Response:
        """The error answer for ``exc``: its status and message for an APIError, else a logged 500."""
        if not isinstance(exc, APIError):
            log.error("unexpected error in %s", where, exc_info=exc)
            return self.error_reply(500, f"unexpected server error: {type(exc).__name__}: {exc}")
        status = exc.status or 500
        body = _wire.error_body(type(exc).__name__, clip(exc.message), exc.code)
        response = self.reply(body, status)
        if isinstance(exc, _NOT_RETRIED) or status == 413:
            response.headers[_wire.SHOULD_RETRY] = "false"
        return response
