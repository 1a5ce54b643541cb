"""Wire protocol v1 messages: decode what clients send, encode what the gateway says.

Decoding is one msgspec pass over a tagged union (`op` is the tag, unknown fields
are refused) with the client's `data` kept as raw JSON bytes, so it reaches the
envelope without being decoded and re-encoded. Any payload gives a `ClientMessage`
or a `BadMessage`, never an exception; error texts name the rule broken and never
echo more than a few dozen bytes of the input. Encoders build JSON bytes (no
framing) with `data` inserted as given.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

import msgspec

from portao.errors import ErrorCode
from portao.names import NAME_PATTERN
from portao.wire.events import (
    Auth,
    BadMessage,
    Call,
    ClientMessage,
    Ping,
    RequestId,
    Send,
    Sub,
    Unsub,
)

MAX_ID_CHARS: Final = 64
_ECHO_CHARS = 64

# msgspec searches patterns with `re.search`: anchor with \Z, since `$` would also
# accept a name followed by a newline.
_Name = Annotated[str, msgspec.Meta(pattern=rf"^(?:{NAME_PATTERN.pattern})\Z")]
_Id = (
    Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
    | Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
)


# -- client -> gateway ----------------------------------------------------------


class _In(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    pass


class _Auth(_In, tag="auth"):
    token: str
    id: _Id | None = None


class _Call(_In, tag="call"):
    id: _Id
    route: _Name
    data: msgspec.Raw


class _Send(_In, tag="send"):
    route: _Name
    data: msgspec.Raw
    id: _Id | None = None


class _Sub(_In, tag="sub"):
    room: _Name
    id: _Id | None = None


class _Unsub(_In, tag="unsub"):
    room: _Name
    id: _Id | None = None


class _Ping(_In, tag="ping"):
    id: _Id | None = None


class _IdProbe(msgspec.Struct):
    """Reads only a valid `id` from a rejected message, so its error can carry it."""

    id: _Id | None = None


_decoder = msgspec.json.Decoder(_Auth | _Call | _Send | _Sub | _Unsub | _Ping)
_id_decoder = msgspec.json.Decoder(_IdProbe)
_OPS = "auth, call, send, sub, unsub, ping"
_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")
_FIELD_ERROR = re.compile(r" - at `\$\.([A-Za-z_]+)`$")
_FIELD_NAME = re.compile(r"field `(.*)`$", re.DOTALL)
_FIELD_RULES = {
    "op": f"field `op` must be one of {_OPS}",
    "id": f"field `id` must be an integer or a string of at most {MAX_ID_CHARS} characters",
    "route": f"field `route` must match {NAME_PATTERN.pattern}",
    "room": f"field `room` must match {NAME_PATTERN.pattern}",
    "token": "field `token` must be a string",
}


def decode_message(payload: bytes) -> ClientMessage | BadMessage:
    """Decode one client frame; anything invalid becomes a `BadMessage`."""
    try:
        message = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        if _OBJECT_START.match(payload) is None:
            return BadMessage(ErrorCode.BAD_FRAME, "a message must be a JSON object")
        return BadMessage(ErrorCode.BAD_REQUEST, _describe(str(exc)), _read_id(payload))
    except msgspec.DecodeError as exc:
        return BadMessage(ErrorCode.BAD_FRAME, f"not valid UTF-8 JSON ({exc})")
    except RecursionError:
        return BadMessage(ErrorCode.BAD_REQUEST, "JSON nested too deeply", None)
    match message:
        case _Call(id=id, route=route, data=raw):
            data = _utf8_or_none(raw)
            return Call(id, route, data) if data is not None else _bad_utf8(id)
        case _Send(route=route, data=raw, id=id):
            data = _utf8_or_none(raw)
            return Send(route, data, id) if data is not None else _bad_utf8(id)
        case _Auth(token=token, id=id):
            return Auth(token, id)
        case _Sub(room=room, id=id):
            return Sub(room, id)
        case _Unsub(room=room, id=id):
            return Unsub(room, id)
        case _Ping(id=id):
            return Ping(id)
    raise AssertionError(f"unhandled message type {type(message).__name__}")


def _utf8_or_none(raw: msgspec.Raw) -> bytes | None:
    """The raw `data` bytes, or None when not UTF-8 (msgspec skips them unchecked)."""
    data = bytes(raw)
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return None
    return data


def _bad_utf8(id: RequestId | None) -> BadMessage:
    return BadMessage(ErrorCode.BAD_FRAME, "not valid UTF-8 JSON", id)


def _read_id(payload: bytes) -> RequestId | None:
    try:
        return _id_decoder.decode(payload).id
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None


def _describe(error: str) -> str:
    """Turn a msgspec validation error into the rule the client broke."""
    field = _FIELD_ERROR.search(error)
    if field is not None and field.group(1) in _FIELD_RULES:
        return _FIELD_RULES[field.group(1)]
    if error.startswith("Object missing required field"):
        name = _FIELD_NAME.search(error)
        if name is not None:
            return f"field `{name.group(1)}` is required"
    if error.startswith("Object contains unknown field"):
        name = _FIELD_NAME.search(error)
        if name is not None:
            return f"unknown field `{_clip(name.group(1))}`"
    return _clip(error)


def _clip(text: str) -> str:
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "…"


# -- gateway -> client ----------------------------------------------------------


class _Out(msgspec.Struct, tag_field="op", omit_defaults=True):
    pass


class _Ok(_Out, tag="ok"):
    user: str
    id: RequestId | None = None


class _Reply(_Out, tag="reply"):
    id: RequestId
    data: msgspec.Raw


class _Ack(_Out, tag="ack"):
    id: RequestId


class _Error(_Out, tag="error"):
    code: str
    message: str
    id: RequestId | None = None


class _Push(_Out, tag="push"):
    route: str
    data: msgspec.Raw
    room: str | None = None


class _Pong(_Out, tag="pong"):
    id: RequestId | None = None


class _Bye(_Out, tag="bye"):
    code: str
    message: str
    retry_after_ms: int | None = None


_encode = msgspec.json.Encoder().encode


def encode_ok(user: str, id: RequestId | None = None) -> bytes:
    """`ok`: auth accepted, or sub/unsub done."""
    return _encode(_Ok(id=id, user=user))


def encode_reply(id: RequestId, data: bytes) -> bytes:
    """`reply` to a call; `data` is JSON bytes inserted as they are."""
    return _encode(_Reply(id=id, data=msgspec.Raw(data)))


def encode_ack(id: RequestId) -> bytes:
    """`ack`: the broker accepted a `send` that had an id."""
    return _encode(_Ack(id=id))


def encode_error(code: str, message: str, id: RequestId | None = None) -> bytes:
    """`error` answering a request (with its id when it had one)."""
    return _encode(_Error(id=id, code=code, message=message))


def encode_push(route: str, data: bytes, room: str | None = None) -> bytes:
    """`push`: a server-initiated message; `data` is JSON bytes inserted as they are."""
    return _encode(_Push(route=route, room=room, data=msgspec.Raw(data)))


def encode_pong(id: RequestId | None = None) -> bytes:
    """`pong` answering a ping."""
    return _encode(_Pong(id=id))


def encode_bye(code: str, message: str, retry_after_ms: int | None = None) -> bytes:
    """`bye`: the gateway is closing the connection."""
    return _encode(_Bye(code=code, message=message, retry_after_ms=retry_after_ms))


_server_decoder = msgspec.json.Decoder(dict[str, Any])


def decode_server_message(payload: bytes) -> dict[str, Any] | BadMessage:
    """Decode a gateway -> client frame (used by `portao.client`) into a dict.

    `data` comes back as Python values. Anything but a JSON object with a string
    `op` is a `BadMessage`.
    """
    try:
        message = _server_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        return BadMessage(ErrorCode.BAD_FRAME, f"not a JSON object ({_clip(str(exc))})")
    if not isinstance(message.get("op"), str):
        return BadMessage(ErrorCode.BAD_REQUEST, "field `op` must be a string")
    return message
