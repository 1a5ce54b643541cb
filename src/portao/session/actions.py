"""What a session decides: work for the asyncio shell to carry out.

The session never does I/O; it returns these, and the gateway executes them in
order. Payloads are encoded JSON messages (no framing) ready for the codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from portao.envelope import Envelope
from portao.errors import ErrorCode
from portao.wire.events import RequestId


@dataclass(frozen=True, slots=True)
class SendPayload:
    """Write one gateway message to the client; `error` names it when it is one (metrics)."""

    payload: bytes = field(repr=False)
    error: ErrorCode | None = None


@dataclass(frozen=True, slots=True)
class CloseWith:
    """Send `bye` with this code and close the connection right after."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Hand an envelope to the broker.

    On success a `send` with an id is answered `ack`; on failure the request is
    answered `error` with the broker's code (for a call: only if still pending).
    """

    envelope: Envelope
    client_id: RequestId | None


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The connection's user is now known: bind it for `push_user`, answer `ok`."""

    user: str
    client_id: RequestId | None


@dataclass(frozen=True, slots=True)
class JoinRoom:
    """Client `sub`: join the room, then answer `ok`."""

    room: str
    client_id: RequestId | None


@dataclass(frozen=True, slots=True)
class LeaveRoom:
    """Client `unsub`: leave the room, then answer `ok`."""

    room: str
    client_id: RequestId | None


@dataclass(frozen=True, slots=True)
class PauseReading:
    """Rate limit hit: stop reading the socket until `until` (epoch seconds).

    With `hold`, the event was not consumed: feed it again after the pause.
    """

    until: float
    hold: bool = False


Action = SendPayload | CloseWith | Publish | Authenticated | JoinRoom | LeaveRoom | PauseReading
