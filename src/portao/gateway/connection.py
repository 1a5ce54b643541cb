"""One client connection: the thin asyncio shell around a codec and a session.

read → feed the codec → hand events to the session → carry out its actions.
An `asyncio.Protocol` (not a task per connection): no stack, no task, a few
slotted attributes — measured cheaper per idle connection (docs/benchmarks.md).
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
from portao.session.lifecycle import Session, State
from portao.wire import messages as wire
from portao.wire.events import FrameEvent
from portao.wire.framing import FrameCodec

if TYPE_CHECKING:
    from portao.gateway.server import Gateway

log = logging.getLogger("portao.gateway")

#: How long a closing connection may take to flush its `bye` before it is aborted.
CLOSE_GRACE_S = 2.0


class ClientConnection(asyncio.Protocol):
    """Protocol object for one accepted socket."""

    __slots__ = (
        "_backlog",
        "_closing",
        "_codec",
        "_gateway",
        "_paused",
        "_timer",
        "_timer_at",
        "_transport",
        "conn_id",
        "in_flight",
        "session",
    )

    def __init__(self, gateway: Gateway, codec_factory: Callable[[int], FrameCodec]) -> None:
        self._gateway = gateway
        self._codec = codec_factory(gateway.settings.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._backlog: list[FrameEvent] = []
        self._paused = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.conn_id = 0
        self.in_flight = 0  # publishes awaiting the broker (sends with an id, calls)
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
            self._write(wire.encode_bye(ErrorCode.OVERLOADED, "connection limit reached"))
            transport.close()
            return
        self.session = gateway.new_session(self.conn_id)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._codec.receive_data(data)
        self._backlog.extend(self._codec.events_received())
        self._process()

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.session is not None:
            self.session.mark_closed()
            self._gateway.forget(self)

    # -- input --------------------------------------------------------------------

    def _process(self) -> None:
        session = self.session
        if session is None or self._paused:
            return
        backlog = self._backlog
        now = time.time()
        index = 0
        while index < len(backlog) and not self._closing and not self._paused:
            actions = session.receive_event(backlog[index], now)
            if not (actions and isinstance(actions[0], PauseReading) and actions[0].hold):
                index += 1  # consumed; a held event is fed again after the pause
            self._execute(actions)
        del backlog[:index]
        if not self._closing:
            self._arm_timer()

    def _execute(self, actions: list[Action]) -> None:
        gateway = self._gateway
        for action in actions:
            match action:
                case SendPayload(payload=payload):
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
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            return
        self._timer_at = deadline
        delay = max(0.0, deadline - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is None or self._closing:
            return
        self._execute(self.session.on_deadline(time.time()))
        if not self._closing:
            self._arm_timer()

    # -- output -------------------------------------------------------------------

    def send_payload(self, payload: bytes) -> None:
        """Write one message; past the outbound cap the client is a slow consumer."""
        if self._closing:
            return
        self._write(payload)
        transport = self._transport
        assert transport is not None
        if transport.get_write_buffer_size() > self._gateway.settings.outbound_buffer_bytes:
            self._gateway.stats.slow_consumers += 1
            self.close_with(ErrorCode.SLOW_CONSUMER, "outbound buffer full")

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
        self.close()

    def close(self) -> None:
        """Close after flushing what is buffered (bounded by CLOSE_GRACE_S)."""
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self.session is not None and self.session.state is not State.CLOSED:
            self.session.mark_closed()
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)

    @property
    def is_closing(self) -> bool:
        return self._closing

    @property
    def buffered_bytes(self) -> int:
        """Bytes written and not yet taken by the kernel (read by the metrics)."""
        transport = self._transport
        return 0 if transport is None else transport.get_write_buffer_size()
