"""One client connection: the thin asyncio shell around a codec and a session.

read → feed the codec → hand events to the session → carry out its actions.
An `asyncio.Protocol` (not a task per connection): no stack, no task, a few
slotted attributes — measured cheaper per idle connection (docs/benchmarks.md).

A WebSocket codec needs a little more of the shell, kept off the stream path: its
own bytes (handshake response, pongs, pings, close frame) are written right after
each call that makes them, its ping timer joins the session's deadlines, a
`?token=` in the URL is an `auth` before any message, and a close waits for the
client's close frame (RFC 6455 §7.1.1) before the TCP connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING

from portao.errors import ErrorCode
from portao.gateway.listeners import set_keepalive
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
from portao.session.auth import AuthFailure
from portao.session.lifecycle import Session, State
from portao.wire import messages as wire
from portao.wire.events import Auth, FrameEvent
from portao.wire.framing import FrameCodec
from portao.wire.websocket import WebSocketCodec

if TYPE_CHECKING:
    from portao.gateway.server import Gateway

log = logging.getLogger("portao.gateway")

#: How long a closing connection may take to flush its `bye` before it is aborted.
CLOSE_GRACE_S = 2.0
#: A deadline further away than this (a token's expiry, an hour out, say) gets no
#: timer of its own yet: the connection waits in `FarDeadlines`.
TIMER_HORIZON_S = 60.0


class FarDeadlines:
    """Connections whose next deadline is far off, in one-second buckets, under one
    timer: each gets a timer of its own once its deadline is within TIMER_HORIZON_S.
    A timer handle costs an idle connection about 600 bytes.
    """

    __slots__ = ("_buckets", "_handle", "_next")

    def __init__(self) -> None:
        self._buckets: dict[int, dict[int, ClientConnection]] = {}
        self._next = 0  # the first second not yet handled
        self._handle: asyncio.TimerHandle | None = None

    def add(self, conn: ClientConnection, at: float) -> int:
        """Call `conn.far_deadline_due(key)` at `at` (to the second); returns the key."""
        if self._handle is None:
            self._next = max(self._next, int(time.time()))
            self._handle = asyncio.get_running_loop().call_later(1.0, self._tick)
        key = max(int(at), self._next)
        self._buckets.setdefault(key, {})[conn.conn_id] = conn
        return key

    def remove(self, conn: ClientConnection, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.pop(conn.conn_id, None) is not None and not bucket:
            del self._buckets[key]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._buckets.clear()

    def _tick(self) -> None:
        now = time.time()
        buckets = self._buckets
        while self._next <= now and buckets:
            key = self._next
            self._next += 1
            for conn in buckets.pop(key, {}).values():
                conn.far_deadline_due(key)
        self._handle = (
            asyncio.get_running_loop().call_later(1.0, self._tick) if buckets else None
        )


class ClientConnection(asyncio.Protocol):
    """Protocol object for one accepted socket."""

    __slots__ = (
        "_accepted_at",
        "_backlog",
        "_closing",
        "_codec",
        "_far",
        "_gateway",
        "_paused",
        "_queued",
        "_timer",
        "_timer_at",
        "_transport",
        "_ws",
        "conn_id",
        "in_flight",
        "read_eof",
        "session",
    )

    def __init__(self, gateway: Gateway, codec_factory: Callable[[int], FrameCodec]) -> None:
        self._gateway = gateway
        self._accepted_at = time.time()  # before a TLS handshake: it counts as auth time
        codec = self._codec = codec_factory(gateway.settings.max_frame_bytes)
        self._ws = codec if isinstance(codec, WebSocketCodec) else None
        self._transport: asyncio.Transport | None = None
        # Events not yet handled (held by a rate-limit pause); None when there are none.
        self._backlog: list[FrameEvent] | None = None
        self._paused = False
        self._queued: list[bytes] | None = None  # see queue_payload
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._far = 0  # the FarDeadlines key this connection waits under, if any
        self.conn_id = 0
        self.in_flight = 0  # requests awaiting the broker (publishes, auth binding, sub/unsub)
        self.read_eof = False  # the client shut its write side: answer, then close
        self.session: Session | None = None

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self._transport = typing.cast(asyncio.Transport, transport)
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # the socket may already be gone
                set_keepalive(sock)
        gateway = self._gateway
        if not gateway.admit(self):
            self._closing = True
            if self._ws is not None:
                # The bye can only go out after the handshake (see _linger).
                asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._transport.abort)
                return
            self._write(wire.encode_bye(ErrorCode.OVERLOADED, "connection limit reached"))
            transport.close()
            return
        self.session = Session(
            self.conn_id,
            gateway.id,
            gateway.limits,
            gateway.verifier,
            gateway.pending,
            self._accepted_at,
        )
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            if self._ws is not None:
                self._linger(self._ws, data)
            return
        codec = self._codec
        codec.receive_data(data)
        ws = self._ws
        if ws is not None:
            self._flush_codec()
            token = ws.take_url_token()
            if token is not None:
                self._auth_from_url(token)
        self._take_events(codec.events_received())
        self._process()
        if ws is not None and ws.is_closed and not self._closing:
            self.close()  # the client's close frame, echoed: closing handshake done

    def eof_received(self) -> bool:
        ws = self._ws
        transport = self._transport
        if ws is not None or transport is None or transport.get_extra_info("ssl_object"):
            # WebSocket: EOF ends the session (RFC 6455); TLS transports cannot half-close.
            if ws is not None:
                ws.receive_data(b"")
            self.close()
            return False
        # Half-close (`nc -q1`, shutdown(SHUT_WR)): nothing more will come, but what is
        # in flight is still answered (reply, or error at its deadline), then we close.
        self.read_eof = True
        self._gateway.close_if_answered(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop_far()
        if self.session is not None:
            self.session.mark_closed()
            self._gateway.forget(self)

    # -- input --------------------------------------------------------------------

    def _take_events(self, events: list[FrameEvent]) -> None:
        if not events:
            return
        if self._backlog:
            self._backlog.extend(events)
        else:
            self._backlog = events

    def _process(self) -> None:
        session = self.session
        if session is None or self._paused:
            return
        backlog = self._backlog
        if backlog is not None:
            now = time.time()
            index = 0
            while index < len(backlog) and not self._closing and not self._paused:
                actions = session.receive_event(backlog[index], now)
                if not (actions and isinstance(actions[0], PauseReading) and actions[0].hold):
                    index += 1  # consumed; a held event is fed again after the pause
                self._execute(actions)
            if index == len(backlog):
                self._backlog = None
            else:
                del backlog[:index]
        if not self._closing:
            self._arm_timer()

    def _execute(self, actions: list[Action]) -> None:
        gateway = self._gateway
        for action in actions:
            match action:
                case SendPayload(payload=payload, error=error):
                    if error is not None:
                        gateway.stats.count_error(error.value)
                    self.send_payload(payload)
                case Publish():
                    gateway.publish(self, action)
                case Authenticated():
                    gateway.authenticated(self, action)
                case JoinRoom():
                    gateway.join_room(self, action)
                case LeaveRoom():
                    gateway.leave_room(self, action)
                case PauseReading(until=until):
                    self._pause_until(until)
                case CloseWith(code=code, message=message):
                    self.close_with(code, message)

    def start_draining(self, retry_after_ms: int) -> None:
        """Graceful shutdown: tell the client; later requests get `shutdown`."""
        if self.session is not None and not self._closing:
            self._execute(self.session.start_draining(retry_after_ms))

    def _pause_until(self, until: float) -> None:
        """Rate limit: stop reading this socket until the bucket refills."""
        if self._transport is None or self._closing:
            return
        self._paused = True
        self._transport.pause_reading()
        delay = max(0.0, until - time.time())
        asyncio.get_running_loop().call_later(delay, self._resume)

    def _resume(self) -> None:
        if self._closing or self._transport is None:
            return
        self._paused = False
        self._process()
        if not self._paused and not self._closing:
            self._transport.resume_reading()

    # -- timers -------------------------------------------------------------------

    def _arm_timer(self) -> None:
        session = self.session
        deadline = session.next_deadline() if session is not None else None
        if self._ws is not None:
            ping_at = self._ws.next_deadline(time.time())
            if ping_at is not None and (deadline is None or ping_at < deadline):
                deadline = ping_at
        if deadline == self._timer_at and (self._timer is not None or self._far):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            self._drop_far()
            return
        self._timer_at = deadline
        delay = deadline - time.time()
        if delay > TIMER_HORIZON_S:
            wake_at = deadline - TIMER_HORIZON_S
            # A deadline that moved later keeps its earlier wake-up (which re-arms).
            if not self._far or self._far > wake_at:
                self._drop_far()
                self._far = self._gateway.far_deadlines.add(self, wake_at)
            return
        self._drop_far()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._on_timer)

    def far_deadline_due(self, key: int) -> None:
        """`FarDeadlines`: the deadline is near now (unless it moved)."""
        if self._far == key:
            self._far = 0
            if not self._closing:
                self._arm_timer()

    def _drop_far(self) -> None:
        if self._far:
            self._gateway.far_deadlines.remove(self, self._far)
            self._far = 0

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is None or self._closing:
            return
        now = time.time()
        self._execute(self.session.on_deadline(now))
        ws = self._ws
        if ws is not None and not self._closing:
            ws.on_deadline(now)  # a ping, or the event that the client went silent
            self._flush_codec()
            self._take_events(ws.events_received())
            self._process()
        if not self._closing:
            self._arm_timer()

    # -- output -------------------------------------------------------------------

    def send_payload(self, payload: bytes) -> None:
        """Write one message; past the outbound cap the client is a slow consumer."""
        if self._closing:
            return
        self._write(payload)
        self._check_buffer()

    def _check_buffer(self) -> None:
        transport = self._transport
        assert transport is not None
        if transport.get_write_buffer_size() > self._gateway.settings.outbound_buffer_bytes:
            self._gateway.stats.slow_consumers += 1
            self.close_with(ErrorCode.SLOW_CONSUMER, "outbound buffer full")

    def queue_payload(self, payload: bytes) -> bool:
        """Hold a message until `flush_queued`, so that the replies one inbox batch
        holds for this connection leave in one write; True for the first one held."""
        queued = self._queued
        if queued is None:
            self._queued = [payload]
            return True
        queued.append(payload)
        return False

    def flush_queued(self) -> None:
        """Write what `queue_payload` held (as `send_payload` would, all at once)."""
        queued, self._queued = self._queued, None
        if not queued:
            return
        if len(queued) == 1:
            self.send_payload(queued[0])
            return
        if self._closing:
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            frame = self._codec.send_frame
            transport.write(b"".join([frame(payload) for payload in queued]))
        self._check_buffer()

    def _write(self, payload: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(self._codec.send_frame(payload))

    def close_with(self, code: ErrorCode, message: str) -> None:
        """Send `bye` and close; abort if the peer does not take it in time."""
        if self._closing:
            return
        self._gateway.stats.count_close(code, self.conn_id)
        self._write(wire.encode_bye(code, message))
        self._close(code)

    def close(self) -> None:
        """Close after flushing what is buffered (bounded by CLOSE_GRACE_S)."""
        draining = self.session is not None and self.session.state is State.DRAINING
        self._close(ErrorCode.SHUTDOWN if draining else None)

    def _close(self, code: ErrorCode | None) -> None:
        """Close; a WebSocket first sends the close frame that goes with `code`."""
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self.session is not None and self.session.state is not State.CLOSED:
            self.session.mark_closed()
        loop = asyncio.get_running_loop()
        loop.call_later(CLOSE_GRACE_S, transport.abort)
        ws = self._ws
        if ws is not None:
            ws.send_close(code)
            self._flush_codec()
            if ws.awaits_close_frame:
                return  # _linger closes TCP when the client's close frame arrives
        transport.close()

    # -- WebSocket ------------------------------------------------------------------

    def _flush_codec(self) -> None:
        """Write the codec's own bytes, in order with the messages written before."""
        out = self._codec.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)
            if not self._closing:  # pongs to a ping flood count against the cap too
                self._check_buffer()

    def _auth_from_url(self, token: str) -> None:
        """`?token=`: `ok` at once, or `bye unauthorized` (close 1008), never an error."""
        session = self.session
        if session is None:
            return
        now = time.time()
        verdict = self._gateway.verifier.verify(token, now)
        if isinstance(verdict, AuthFailure):
            self.close_with(ErrorCode.UNAUTHORIZED, verdict.message)
        else:
            self._execute(session.receive_message(Auth(token), now))

    def _linger(self, ws: WebSocketCodec, data: bytes) -> None:
        """Bytes after we started closing: only the closing handshake matters now."""
        ws.receive_data(data)
        ws.events_received()  # dropped: the connection is closing
        self._flush_codec()
        if self.session is None and ws.is_open:  # refused past the connection cap
            self._write(wire.encode_bye(ErrorCode.OVERLOADED, "connection limit reached"))
            ws.send_close(ErrorCode.OVERLOADED)
            self._flush_codec()
        if ws.is_closed and self._transport is not None:
            self._transport.close()

    @property
    def is_closing(self) -> bool:
        return self._closing

    @property
    def buffered_bytes(self) -> int:
        """Bytes written and not yet taken by the kernel (read by the metrics)."""
        transport = self._transport
        return 0 if transport is None else transport.get_write_buffer_size()
