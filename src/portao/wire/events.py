"""Events the wire layer produces: frames from a codec, messages from a frame.

Frozen msgspec structs (a few per message: several times cheaper to make than
frozen dataclasses); their `repr` elides payloads and tokens so they can be
logged. `data` of `Call` and `Send` is the client's raw JSON bytes, passed on to
the envelope untouched.
"""

from __future__ import annotations

import msgspec

from portao.errors import ErrorCode

RequestId = int | str


class _Event(msgspec.Struct, frozen=True, gc=False):
    """Holds no containers of its own: never part of a cycle, so not tracked by the GC."""


# -- framing events ------------------------------------------------------------


class Frame(_Event, frozen=True, gc=False):
    """One complete JSON payload (framing removed)."""

    payload: bytes

    def __repr__(self) -> str:
        return f"Frame(<{len(self.payload)} bytes>)"


class FrameError(_Event, frozen=True, gc=False):
    """The peer broke the framing. `fatal` means the connection must end."""

    code: ErrorCode
    message: str
    fatal: bool


FrameEvent = Frame | FrameError


# -- client -> gateway messages -----------------------------------------------


class Auth(_Event, frozen=True, gc=False):
    token: str
    id: RequestId | None = None

    def __repr__(self) -> str:
        return f"Auth(id={self.id!r})"


class Call(_Event, frozen=True, gc=False):
    id: RequestId
    route: str
    data: bytes

    def __repr__(self) -> str:
        return f"Call(id={self.id!r}, route={self.route!r})"


class Send(_Event, frozen=True, gc=False):
    route: str
    data: bytes
    id: RequestId | None = None

    def __repr__(self) -> str:
        return f"Send(route={self.route!r}, id={self.id!r})"


class Sub(_Event, frozen=True, gc=False):
    room: str
    id: RequestId | None = None


class Unsub(_Event, frozen=True, gc=False):
    room: str
    id: RequestId | None = None


class Ping(_Event, frozen=True, gc=False):
    id: RequestId | None = None


class BadMessage(_Event, frozen=True, gc=False):
    """A frame that is not a valid client message.

    `code` is `bad_frame` (not JSON, bad UTF-8, not an object) or `bad_request`;
    `id` is the request's id when one could be read from it, else None.
    """

    code: ErrorCode
    message: str
    id: RequestId | None = None


ClientMessage = Auth | Call | Send | Sub | Unsub | Ping
