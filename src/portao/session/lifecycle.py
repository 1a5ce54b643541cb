"""One connection's protocol state machine, sans-I/O.

    AWAITING_AUTH ──auth ok──▶ OPEN ──drain──▶ DRAINING ──close──▶ CLOSED
          │                     │                                    ▲
          └─ 3 failed auths, auth deadline, token expiry, idle ─────┘

The gateway feeds it framing events with the current wall-clock time and carries
out the returned actions; it asks `next_deadline()` when to call `on_deadline()`.
Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from portao.config import Settings
from portao.envelope import Envelope, new_message_id
from portao.errors import ErrorCode
from portao.routing.pending import PendingCalls
from portao.session.actions import (
    Action,
    Authenticated,
    CloseWith,
    JoinRoom,
    LeaveRoom,
    PauseReading,
    Publish,
    SendPayload,
)
from portao.session.auth import AuthFailure, Claims, TokenVerifier
from portao.session.ratelimit import TokenBucket
from portao.wire import messages as wire
from portao.wire.events import (
    Auth,
    BadMessage,
    Call,
    ClientMessage,
    FrameError,
    FrameEvent,
    Ping,
    RequestId,
    Send,
    Sub,
    Unsub,
)

MAX_AUTH_FAILURES = 3


class State(Enum):
    AWAITING_AUTH = "awaiting_auth"
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-connection limits a session enforces (from `Settings`)."""

    auth_timeout_s: float = 10.0
    idle_timeout_s: float = 0.0
    call_timeout_s: float = 30.0
    max_pending_calls: int = 1000
    rate_limit_per_s: float = 1000.0
    rate_burst: int = 2000

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            auth_timeout_s=settings.auth_timeout_s,
            idle_timeout_s=settings.idle_timeout_s,
            call_timeout_s=settings.call_timeout_s,
            max_pending_calls=settings.max_pending_calls,
            rate_limit_per_s=settings.rate_limit_per_s,
            rate_burst=settings.rate_burst,
        )


class Session:
    """The decisions for one client connection."""

    __slots__ = (
        "_auth_deadline",
        "_auth_failures",
        "_bucket",
        "_claims",
        "_last_frame_at",
        "_limits",
        "_pending",
        "_rate_limited",
        "_rooms",
        "_verifier",
        "conn",
        "gateway_id",
        "state",
    )

    def __init__(
        self,
        conn: int,
        gateway_id: str,
        limits: Limits,
        verifier: TokenVerifier,
        pending: PendingCalls,
        now: float,
    ) -> None:
        self.conn = conn
        self.gateway_id = gateway_id
        self.state = State.AWAITING_AUTH
        self._rooms: set[str] | None = None  # made on the first join: most never join
        self._limits = limits
        self._verifier = verifier
        self._pending = pending
        self._claims: Claims | None = None
        self._auth_failures = 0
        self._auth_deadline = now + limits.auth_timeout_s
        self._last_frame_at = now
        self._bucket = TokenBucket(limits.rate_limit_per_s, limits.rate_burst, now)
        self._rate_limited = False

    @property
    def user(self) -> str | None:
        return self._claims.sub if self._claims is not None else None

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    # -- rooms (the gateway's bookkeeping of this connection's memberships) -------

    def add_room(self, room: str) -> None:
        if self._rooms is None:
            self._rooms = set()
        self._rooms.add(room)

    def discard_room(self, room: str) -> None:
        if self._rooms is not None:
            self._rooms.discard(room)

    def take_rooms(self) -> list[str]:
        """Every room, forgotten (the connection is gone)."""
        rooms, self._rooms = self._rooms, None
        return list(rooms or ())

    # -- input ------------------------------------------------------------------

    def receive_event(self, event: FrameEvent, now: float) -> list[Action]:
        """Handle one framing event; returns the actions to carry out in order."""
        if self.state is State.CLOSED:
            return []
        self._last_frame_at = now
        if isinstance(event, FrameError):
            if event.fatal:
                return self._close(event.code, event.message)
            return [self._error(event.code, event.message, None)]
        bucket = self._bucket
        # Checked before taking: right after a take the bucket is never full.
        if self._rate_limited and bucket.is_full(now):
            self._rate_limited = False
        if not bucket.try_take(now):
            # Only the first message over the limit is answered; after that the
            # client just waits (backpressure, not an error storm) until it has
            # stayed under the rate long enough for the bucket to fill again.
            if self._rate_limited:
                return [PauseReading(bucket.next_token_at(now), hold=True)]
            self._rate_limited = True
            request_id = wire.decode_message(event.payload).id
            return [
                self._error(ErrorCode.RATE_LIMITED, "rate limit exceeded", request_id),
                PauseReading(bucket.next_token_at(now)),
            ]
        return self.receive_message(wire.decode_message(event.payload), now)

    def receive_message(self, message: ClientMessage | BadMessage, now: float) -> list[Action]:
        """Handle one decoded client message."""
        if self.state is State.CLOSED:
            return []
        match message:
            case BadMessage(code=code, message=text, id=request_id):
                return [self._error(code, text, request_id)]
            case Ping(id=request_id):
                return [SendPayload(wire.encode_pong(request_id))]
            case Auth():
                return self._auth(message, now)
        request_id = message.id
        if self.state is State.DRAINING:
            return [self._error(ErrorCode.SHUTDOWN, "the gateway is shutting down", request_id)]
        claims = self._claims
        if claims is None:
            return [self._error(ErrorCode.UNAUTHORIZED, "authenticate first", request_id)]
        match message:
            case Call():
                return self._call(message, claims.sub, now)
            case Send(route=route, data=data, id=request_id):
                envelope = self._envelope("send", route, claims.sub, data, None)
                return [Publish(envelope, request_id)]
            case Sub(room=room, id=request_id):
                if not claims.may_join(room):
                    return [
                        self._error(
                            ErrorCode.FORBIDDEN, f"token does not allow room {room!r}", request_id
                        )
                    ]
                return [JoinRoom(room, request_id)]
            case Unsub(room=room, id=request_id):
                return [LeaveRoom(room, request_id)]
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    def _auth(self, message: Auth, now: float) -> list[Action]:
        if self.state is State.DRAINING:
            return [self._error(ErrorCode.SHUTDOWN, "the gateway is shutting down", message.id)]
        result = self._verifier.verify(message.token, now)
        if isinstance(result, AuthFailure):
            self._auth_failures += 1
            if self._auth_failures >= MAX_AUTH_FAILURES:
                return self._close(ErrorCode.UNAUTHORIZED, "too many failed auth attempts")
            return [self._error(ErrorCode.UNAUTHORIZED, result.message, message.id)]
        if self._claims is not None:
            if result.sub != self._claims.sub:
                return [
                    self._error(
                        ErrorCode.FORBIDDEN, "a connection cannot change its user", message.id
                    )
                ]
            self._claims = result  # refresh: new expiry and rooms
            return [SendPayload(wire.encode_ok(result.sub, message.id))]
        self._claims = result
        self.state = State.OPEN
        return [Authenticated(result.sub, message.id)]

    def _call(self, message: Call, user: str, now: float) -> list[Action]:
        pending = self._pending
        if pending.has_client_id(self.conn, message.id):
            # No id: the answer must not be mistaken for the pending call's.
            text = f"call id {message.id!r} is already pending"
            return [self._error(ErrorCode.BAD_REQUEST, text, None)]
        if pending.count(self.conn) >= self._limits.max_pending_calls:
            return [self._error(ErrorCode.OVERLOADED, "too many pending calls", message.id)]
        deadline = now + self._limits.call_timeout_s
        envelope = self._envelope("call", message.route, user, message.data, deadline)
        pending.add(envelope.id, self.conn, message.id, deadline)
        return [Publish(envelope, message.id)]

    def _envelope(
        self, kind: str, route: str, user: str, data: bytes, deadline: float | None
    ) -> Envelope:
        return Envelope(
            id=new_message_id(),
            kind="call" if kind == "call" else "send",
            route=route,
            user=user,
            gateway=self.gateway_id,
            conn=self.conn,
            deadline=deadline,
            data=data,
        )

    # -- time -------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `on_deadline` must run next (epoch seconds), or None."""
        state = self.state
        if state is State.OPEN:
            claims = self._claims
            deadline = claims.exp if claims is not None else None
        elif state is State.AWAITING_AUTH:
            deadline = self._auth_deadline
        else:
            return None
        idle = self._limits.idle_timeout_s
        if idle:
            idle_at = self._last_frame_at + idle
            if deadline is None or idle_at < deadline:
                return idle_at
        return deadline

    def on_deadline(self, now: float) -> list[Action]:
        """Close the connection if a deadline has passed; else nothing."""
        if self.state is State.AWAITING_AUTH and now >= self._auth_deadline:
            return self._close(ErrorCode.UNAUTHORIZED, "authentication timeout")
        if (
            self.state is State.OPEN
            and self._claims is not None
            and self._claims.exp is not None
            and now >= self._claims.exp
        ):
            return self._close(ErrorCode.UNAUTHORIZED, "token expired")
        idle = self._limits.idle_timeout_s
        if (
            idle
            and self.state in (State.AWAITING_AUTH, State.OPEN)
            and now >= self._last_frame_at + idle
        ):
            return self._close(ErrorCode.IDLE_TIMEOUT, f"no frame for {idle:g} s")
        return []

    # -- shutdown ---------------------------------------------------------------

    def start_draining(self, retry_after_ms: int) -> list[Action]:
        """Graceful shutdown: `bye shutdown`; later requests get `shutdown` errors."""
        if self.state in (State.DRAINING, State.CLOSED):
            return []
        self.state = State.DRAINING
        return [
            SendPayload(
                wire.encode_bye(
                    ErrorCode.SHUTDOWN, "the gateway is shutting down", retry_after_ms
                )
            )
        ]

    def mark_closed(self) -> None:
        """The transport is gone; every later input is ignored."""
        self.state = State.CLOSED

    def _close(self, code: ErrorCode, message: str) -> list[Action]:
        self.state = State.CLOSED
        return [CloseWith(code, message)]

    @staticmethod
    def _error(code: ErrorCode, message: str, request_id: RequestId | None) -> SendPayload:
        return SendPayload(wire.encode_error(code, message, request_id), error=code)

