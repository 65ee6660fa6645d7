"""How the server reads and writes bodies: JSON or MessagePack by Content-Type and Accept, and error bodies.

Requests are decoded with the shared msgspec structs (``hpcai_async.types``), so the bodies the official SDK
sends are accepted as they are: ``null`` inside nested objects, integers for floats, ``type`` present or
absent, unknown fields ignored. A body with ``Content-Type: application/msgpack`` is read as MessagePack
(tensors as raw little-endian bytes); an answer is MessagePack when the request's ``Accept`` names
``application/msgpack``, else JSON. Every error answer is ``{"error": <exception class>, "message": <what was
wrong and how to fix it>}`` with the status of ``hpcai_async._errors``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, TypeVar, get_args

import msgspec
from aiohttp import web

from .. import _tensor, types
from .._errors import APIError, BadRequestError, ConflictError, error_for_status
from .scheduler import error_response

__all__ = ("Codec", "status_of")

log = logging.getLogger("hpcai_async.server")

T = TypeVar("T")

_MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
_JSON_ENCODER = msgspec.json.Encoder(enc_hook=_tensor.json_enc_hook)
_MSGPACK_ENCODER = msgspec.msgpack.Encoder(enc_hook=_tensor.msgpack_enc_hook)
_DECODERS: dict[tuple[type[Any], bool], Any] = {}
_PATH_RE = re.compile(r" - at `\$\.?(.*)`$")


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
    "type": tuple(c.__struct_config__.tag for c in get_args(types.ModelInputChunk)),
}


class _SeqOnly(msgspec.Struct):
    """Just the ordering fields of a per-model request (read when the rest of the body is invalid)."""

    model_id: str
    seq_id: int | msgspec.UnsetType = msgspec.UNSET


@dataclasses.dataclass(frozen=True, slots=True)
class Codec:
    """How one request is read and answered: MessagePack or JSON, by its Content-Type and its Accept."""

    msgpack_in: bool = False
    msgpack_out: bool = False

    @classmethod
    def of(cls, request: web.BaseRequest) -> Codec:
        return cls(
            request.content_type in _MSGPACK_TYPES, "application/msgpack" in request.headers.get("Accept", "")
        )

    def _decoder(self, struct: type[T]) -> Any:
        dec = _DECODERS.get((struct, self.msgpack_in))
        if dec is None:
            make = msgspec.msgpack.Decoder if self.msgpack_in else msgspec.json.Decoder
            dec = _DECODERS[(struct, self.msgpack_in)] = make(struct)
        return dec

    def decode(self, raw: bytes, struct: type[T]) -> T:
        """The body as ``struct``; 400 naming the field (or the format) when it is not one."""
        kind = "MessagePack" if self.msgpack_in else "JSON"
        if not raw:
            raise BadRequestError(f"the request body is empty; send a {kind} object ({struct.__name__})")
        try:
            return self._decoder(struct).decode(raw)  # type: ignore[no-any-return]
        except msgspec.ValidationError as exc:
            raise BadRequestError(_friendly(exc)) from None
        except msgspec.DecodeError as exc:
            raise BadRequestError(
                f"the request body is not valid {kind} ({exc}); send Content-Type: "
                f"{'application/msgpack' if self.msgpack_in else 'application/json'} with a {kind} object"
            ) from None

    def seq_of(self, raw: bytes) -> _SeqOnly | None:
        """The model_id and seq_id of a body that did not decode as a whole, if they can still be read."""
        try:
            return self._decoder(_SeqOnly).decode(raw)  # type: ignore[no-any-return]
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None

    def encode(self, obj: Any) -> bytes:
        return (_MSGPACK_ENCODER if self.msgpack_out else _JSON_ENCODER).encode(obj)

    def reply(self, obj: Any, status: int = 200) -> web.Response:
        content_type = "application/msgpack" if self.msgpack_out else "application/json"
        return web.Response(body=self.encode(obj), status=status, content_type=content_type)

    def error(self, exc: BaseException, where: str = "") -> web.Response:
        """The error answer for ``exc``: its status and message for an APIError, else a logged 500."""
        if isinstance(exc, APIError):
            response = self.reply(error_response(exc), exc.status or 500)
            if isinstance(exc, ConflictError):  # the same request conflicts however often it is retried
                response.headers["x-should-retry"] = "false"
            return response
        log.exception("unexpected error in %s", where, exc_info=exc)
        message = f"unexpected server error: {type(exc).__name__}: {exc}"
        return self.reply(types.ErrorResponse(error="InternalServerError", message=message), 500)


def status_of(error: str) -> int:
    """The HTTP status of an ``ErrorResponse.error`` class name (500 if unknown)."""
    for status in (400, 401, 403, 404, 409, 410, 422, 429):
        if error_for_status(status).__name__ == error:
            return status
    return 500
