"""What a session decides: work for the asyncio shell to carry out.

The session never does I/O; it returns these, and the gateway executes them in
order. Payloads are encoded JSON messages (no framing) ready for the codec. Frozen
msgspec structs, like the wire events: one or two are made per message.
"""

from __future__ import annotations

import msgspec

from portao.envelope import Envelope
from portao.errors import ErrorCode
from portao.wire.events import RequestId


class SendPayload(msgspec.Struct, frozen=True, gc=False):
    """Write one gateway message to the client; `error` names it when it is one (metrics)."""

    payload: bytes
    error: ErrorCode | None = None

    def __repr__(self) -> str:
        return f"SendPayload(<{len(self.payload)} bytes>, error={self.error!r})"


class CloseWith(msgspec.Struct, frozen=True, gc=False):
    """Send `bye` with this code and close the connection right after."""

    code: ErrorCode
    message: str


class Publish(msgspec.Struct, frozen=True, gc=False):
    """Hand an envelope to the broker.

    On success a `send` with an id is answered `ack`; on failure the request is
    answered `error` with the broker's code (for a call: only if still pending).
    """

    envelope: Envelope
    client_id: RequestId | None


class Authenticated(msgspec.Struct, frozen=True, gc=False):
    """The connection's user is now known: bind it for `push_user`, answer `ok`."""

    user: str
    client_id: RequestId | None


class JoinRoom(msgspec.Struct, frozen=True, gc=False):
    """Client `sub`: join the room, then answer `ok`."""

    room: str
    client_id: RequestId | None


class LeaveRoom(msgspec.Struct, frozen=True, gc=False):
    """Client `unsub`: leave the room, then answer `ok`."""

    room: str
    client_id: RequestId | None


class PauseReading(msgspec.Struct, frozen=True, gc=False):
    """Rate limit hit: stop reading the socket until `until` (epoch seconds).

    With `hold`, the event was not consumed: feed it again after the pause.
    """

    until: float
    hold: bool = False


Action = SendPayload | CloseWith | Publish | Authenticated | JoinRoom | LeaveRoom | PauseReading
