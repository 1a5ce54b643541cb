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
_id_value_decoder = msgspec.json.Decoder(_Id | None)
_OPS = "auth, call, send, sub, unsub, ping"
_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")
_FIELD_ERROR = re.compile(r" - at `\$\.([A-Za-z_]+)`$")
_FIELD_NAME = re.compile(r"field `(.*)`$", re.DOTALL)
# A number a worker cannot decode: a double overflows only with an exponent of 3+
# digits, or 210+ digits before an exponent of 2; an integer of over 4300 digits is
# refused too. A string holds no number; other `data` is decoded to check only when,
# digits made "0", "E" made "e" and "+" dropped, it holds "e000" or 210 "0"s (a scan
# in C, so the usual message is never decoded twice).
_QUOTE = ord('"')
_decode_any = msgspec.json.decode
_NUMBER_CLASSES = bytes.maketrans(b"123456789E", b"000000000e")
_LONG_RUN = b"0" * 210
_OUT_OF_RANGE = (
    "field `data` holds a number a worker cannot decode (past a double's range, like "
    "1e400, or an integer of over 4300 digits); send it as a string"
)
# A message nested too deeply to decode: its `id` is read only from its first fields
# (up to the first container) or from its last field; a call has at most 4 fields.
_WS = rb"[ \t\r\n]*"
_STRING = rb'"(?:[^"\\]|\\.)*"'
_LEADING_FIELD = re.compile(
    _WS + rb"(" + _STRING + rb")" + _WS + b":" + _WS
    + rb"(" + _STRING + rb"|[-+.0-9eE]+|true|false|null)" + _WS + b","
)
_LAST_ID = re.compile(
    b"," + _WS + b'"id"' + _WS + b":" + _WS + rb"(-?[0-9]+|" + _STRING + b"|null)"
    + _WS + rb"\}" + _WS + rb"\Z"
)
_MAX_FIELDS = 4
_LAST_ID_BYTES = 512  # room for a 64-character id of escapes
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
        return BadMessage(ErrorCode.BAD_REQUEST, "JSON nested too deeply", _shallow_id(payload))
    match message:
        case _Call(id=id, route=route, data=raw):
            data = bytes(raw)
            bad = _bad_data(data, id)
            return Call(id, route, data) if bad is None else bad
        case _Send(route=route, data=raw, id=id):
            data = bytes(raw)
            bad = _bad_data(data, id)
            return Send(route, data, id) if bad is None else bad
        case _Auth(token=token, id=id):
            return Auth(token, id)
        case _Sub(room=room, id=id):
            return Sub(room, id)
        case _Unsub(room=room, id=id):
            return Unsub(room, id)
        case _Ping(id=id):
            return Ping(id)
    raise AssertionError(f"unhandled message type {type(message).__name__}")


def _bad_data(data: bytes, id: RequestId | None) -> BadMessage | None:
    """Why no worker could decode the raw `data` bytes, if so: not UTF-8 (msgspec
    skips `data` unchecked), or a number out of the decoder's range (every attempt
    would fail)."""
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return BadMessage(ErrorCode.BAD_FRAME, "not valid UTF-8 JSON", id)
    if data[0] == _QUOTE:
        return None
    classes = data.translate(_NUMBER_CLASSES, b"+")
    if b"e000" not in classes and _LONG_RUN not in classes:
        return None
    try:
        _decode_any(data)  # as a worker does
    except msgspec.ValidationError:  # the only one: the syntax was checked
        return BadMessage(ErrorCode.BAD_REQUEST, _OUT_OF_RANGE, id)
    except RecursionError:  # deeper in Python's stack than the message's decoding was
        return BadMessage(ErrorCode.BAD_REQUEST, "JSON nested too deeply", id)
    return None


def _shallow_id(payload: bytes) -> RequestId | None:
    """The `id` of a message nested too deeply to decode, when it is among the fields
    before the first container, or the last field (as `portao.client` writes it)."""
    start = _OBJECT_START.match(payload)
    if start is None:
        return None
    position = start.end()
    value = None
    for _ in range(_MAX_FIELDS):
        field = _LEADING_FIELD.match(payload, position)
        if field is None:
            break
        if field.group(1) == b'"id"':
            value = field.group(2)
            break
        position = field.end()
    if value is None:
        last = _LAST_ID.search(payload, max(0, len(payload) - _LAST_ID_BYTES))
        if last is None:
            return None
        value = last.group(1)
    try:
        found: RequestId | None = _id_value_decoder.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return found


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
