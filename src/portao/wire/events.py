"""Events the wire layer produces: frames from a codec, messages from a frame.

Frozen, slotted dataclasses; their `repr` elides payloads and tokens so they can be
logged. `data` of `Call` and `Send` is the client's raw JSON bytes, passed on to the
envelope untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from portao.errors import ErrorCode

RequestId = int | str


# -- framing events ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete JSON payload (framing removed)."""

    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class FrameError:
    """The peer broke the framing. `fatal` means the connection must end."""

    code: ErrorCode
    message: str
    fatal: bool


FrameEvent = Frame | FrameError


# -- client -> gateway messages -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    token: str = field(repr=False)
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Call:
    id: RequestId
    route: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Send:
    route: str
    data: bytes = field(repr=False)
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Sub:
    room: str
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Unsub:
    room: str
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A frame that is not a valid client message.

    `code` is `bad_frame` (not JSON, bad UTF-8, not an object) or `bad_request`;
    `id` is the request's id when one could be read from it, else None.
    """

    code: ErrorCode
    message: str
    id: RequestId | None = None


ClientMessage = Auth | Call | Send | Sub | Unsub | Ping
