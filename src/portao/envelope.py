"""What travels through the broker: envelopes to workers, inbox messages to gateways.

One compact codec (msgpack through msgspec) for every broker. Each encoded value
starts with a version; a decoder refuses versions it does not speak. The client's
`data` stays raw JSON bytes end to end: the gateway never decodes and re-encodes it.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Literal

import msgspec

from portao.errors import EnvelopeError

ENVELOPE_VERSION = 1

Kind = Literal["call", "send"]


class Envelope(msgspec.Struct, frozen=True, array_like=True, tag="env"):
    """A client's `call` or `send`, addressed to a route.

    `gateway` + `conn` is the connection address a reply goes back to; `deadline`
    is wall-clock epoch seconds (calls only); `attempt` counts from 1.
    """

    id: str
    kind: Kind
    route: str
    user: str
    gateway: str
    conn: int
    deadline: float | None
    data: bytes
    attempt: int = 1
    v: int = ENVELOPE_VERSION

    def __repr__(self) -> str:
        return (
            f"Envelope(id={self.id!r}, kind={self.kind!r}, route={self.route!r}, "
            f"gateway={self.gateway!r}, conn={self.conn}, attempt={self.attempt}, "
            f"data=<{len(self.data)} bytes>)"
        )


class Reply(msgspec.Struct, frozen=True, array_like=True, tag="reply"):
    """A worker's answer to the call `ref` from connection `conn`."""

    ref: str
    conn: int
    data: bytes
    v: int = ENVELOPE_VERSION


class ErrorReply(msgspec.Struct, frozen=True, array_like=True, tag="error"):
    """A call that ended in an error (`handler_error` once attempts are spent)."""

    ref: str
    conn: int
    code: str
    message: str
    v: int = ENVELOPE_VERSION


class Push(msgspec.Struct, frozen=True, array_like=True, tag="push"):
    """A server-initiated message.

    Exactly one target: `conn` (one connection of the receiving gateway), `user`
    (every local connection of that user) or `room` (every local member).
    """

    route: str
    data: bytes
    conn: int | None = None
    user: str | None = None
    room: str | None = None
    v: int = ENVELOPE_VERSION

    def __repr__(self) -> str:
        return (
            f"Push(route={self.route!r}, conn={self.conn}, user={self.user!r}, "
            f"room={self.room!r}, data=<{len(self.data)} bytes>)"
        )


class Join(msgspec.Struct, frozen=True, array_like=True, tag="join"):
    """`ctx.join`: connection `conn` (of user `user`) of the receiving gateway joins `room`.

    `user` lets the gateway remove the stored membership when the connection has
    closed before the join arrived.
    """

    conn: int
    room: str
    user: str
    v: int = ENVELOPE_VERSION


class Leave(msgspec.Struct, frozen=True, array_like=True, tag="leave"):
    """`ctx.leave`: connection `conn` (of user `user`) of the receiving gateway leaves `room`."""

    conn: int
    room: str
    user: str
    v: int = ENVELOPE_VERSION


InboxMessage = Reply | ErrorReply | Push | Join | Leave
Wire = Envelope | Reply | ErrorReply | Push | Join | Leave

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Wire)


def encode(message: Wire) -> bytes:
    """Encode an envelope or an inbox message for the broker."""
    return _encoder.encode(message)


def decode(raw: bytes) -> Wire:
    """Decode bytes from the broker; raises `EnvelopeError` on anything else."""
    try:
        message: Wire = _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EnvelopeError(f"undecodable broker message: {exc}") from None
    if message.v != ENVELOPE_VERSION:
        raise EnvelopeError(f"unsupported envelope version {message.v}")
    return message


def decode_envelope(raw: bytes) -> Envelope:
    """Decode bytes that must hold an `Envelope`."""
    message = decode(raw)
    if not isinstance(message, Envelope):
        raise EnvelopeError(f"expected an envelope, got {type(message).__name__}")
    return message


def decode_inbox(raw: bytes) -> InboxMessage:
    """Decode bytes that must hold an inbox message."""
    message = decode(raw)
    if isinstance(message, Envelope):
        raise EnvelopeError("expected an inbox message, got an envelope")
    return message


_NODE = os.urandom(4).hex()
_counter = itertools.count()


def new_message_id() -> str:
    """A unique, time-ordered id: microseconds, a per-process nonce, a counter."""
    return f"{time.time_ns() // 1000:014x}{_NODE}{next(_counter) & 0xFFFFFFFF:08x}"


def new_gateway_id() -> str:
    """A gateway process id, new at every start."""
    return f"gw-{os.urandom(6).hex()}"
