"""WebSocket framing for `ws://` and `wss://`, sans-I/O, over websockets' `ServerProtocol`.

The same shape as the stream codecs (`receive_data` → `events_received`, `send_frame`,
`data_to_send`), plus what only WebSocket has: an HTTP handshake on one path, a
token in the URL (`take_url_token`), a closing handshake with a close code
(`send_close`), and keepalive pings (`next_deadline` / `on_deadline`, fed `now`).

One JSON object per text message. What ends the connection, each as a fatal
`FrameError` so the session says `bye` first; the close frame follows:

    binary message                 bad_frame   close 1003
    text that is not UTF-8         bad_frame   close 1007
    message over max_frame_bytes   too_large   close 1009 (checked after inflating,
                                               and inflating stops at the limit)
    broken framing                 bad_frame   close 1002
    no answer to a ping            idle_timeout close 1000
    failed handshake               bad_request HTTP 4xx, no WebSocket at all

websockets logs through a logger held at WARNING: at DEBUG it would print the
request line, and the request line may carry `?token=`.
"""

from __future__ import annotations

import http
import logging
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import CloseCode, Opcode
from websockets.frames import Frame as WsFrame
from websockets.http11 import Request
from websockets.protocol import CLOSED, CLOSING, CONNECTING, OPEN
from websockets.server import ServerProtocol
from websockets.typing import Origin

from portao.errors import WS_CLOSE_CODES, WS_CLOSE_INTERNAL, ErrorCode
from portao.wire.events import Frame, FrameError, FrameEvent

PING_INTERVAL_S: Final = 20.0
PING_TIMEOUT_S: Final = 20.0

_quiet = logging.getLogger("portao.wire.websocket")
_quiet.setLevel(logging.WARNING)  # never DEBUG: the request line may hold a token

_SEND_EOF = b""


@dataclass(frozen=True, slots=True)
class WsOptions:
    """One WebSocket listener's choices; every timer is finite.

    `origins` empty means any origin; otherwise a browser must send one of them (a
    client with no `Origin` header is not a browser and is let in: tokens, not
    cookies, authenticate, so the check is defence in depth).
    """

    path: str = "/"
    origins: tuple[str, ...] = ()
    compression: bool = False
    ping_interval_s: float = PING_INTERVAL_S
    ping_timeout_s: float = PING_TIMEOUT_S


def close_code_for(code: ErrorCode | None) -> int:
    """The WebSocket close code sent with a `bye` of `code` (None: normal closure)."""
    if code is None:
        return CloseCode.NORMAL_CLOSURE
    return WS_CLOSE_CODES.get(code, WS_CLOSE_INTERNAL)


def _split_target(target: str) -> tuple[str, str]:
    """The path and query of a request target; empty ones when it does not parse."""
    try:
        url = urlsplit(target)
    except ValueError:  # "//[x" reads as a malformed IPv6 host
        return "", ""
    return url.path, url.query


class WebSocketCodec:
    """One WebSocket server connection: handshake, messages, close, keepalive."""

    __slots__ = (
        "_events",
        "_failed",
        "_fragments",
        "_heard",
        "_held_close",
        "_options",
        "_out",
        "_ping_at",
        "_pong_due",
        "_protocol",
        "_url_token",
        "max_frame_bytes",
    )

    def __init__(self, max_frame_bytes: int, options: WsOptions | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes
        options = options or WsOptions()
        self._options = options
        self._protocol = ServerProtocol(
            origins=[*map(Origin, options.origins), None] if options.origins else None,
            extensions=enable_server_permessage_deflate(None) if options.compression else None,
            max_size=max_frame_bytes,
            logger=_quiet,
        )
        self._events: list[FrameEvent] = []
        self._out: list[bytes] = []
        # After a protocol failure, the close frame websockets queued is held back
        # until the session's `bye` is written, then released by send_close.
        self._failed = False
        self._held_close: list[bytes] | None = None
        self._fragments: bytearray | None = None  # a fragmented text message so far
        self._url_token: str | None = None
        self._heard = False  # any byte from the peer since the last ping
        self._ping_at: float | None = None
        self._pong_due: float | None = None

    # -- state ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """The handshake succeeded and neither side has started closing."""
        return self._protocol.state is OPEN and not self._failed

    @property
    def is_closed(self) -> bool:
        """No more events will come: the peer closed, the handshake or framing failed."""
        protocol = self._protocol
        return protocol.eof_sent or protocol.state is CLOSED

    @property
    def awaits_close_frame(self) -> bool:
        """We sent our close frame and wait for the peer's before closing TCP."""
        protocol = self._protocol
        return protocol.state is CLOSING and not protocol.eof_sent

    def take_url_token(self) -> str | None:
        """The `?token=` of the handshake URL, once (then None)."""
        token, self._url_token = self._url_token, None
        return token

    # -- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        protocol = self._protocol
        if self.is_closed:
            return
        if not data:
            protocol.receive_eof()
            self._take_writes()
            return
        self._heard = True
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, WsFrame) and protocol.state is not CONNECTING:
                self._frame(event)
            if self._failed:
                break  # what follows is not read
        if protocol.parser_exc is not None and not self._failed:
            self._peer_failed(protocol.parser_exc)
        elif protocol.state is CONNECTING and protocol.eof_sent and not self._failed:
            # websockets gave up on the request before it was whole
            self._events.append(
                FrameError(ErrorCode.BAD_REQUEST, "not a WebSocket handshake", fatal=True)
            )
        self._take_writes()

    def _handshake(self, request: Request) -> None:
        protocol = self._protocol
        if protocol.eof_sent:
            # Bytes sent behind the request were not frames, and websockets gave up
            # on them before we answered: no response may follow its EOF.
            reason = "not a WebSocket handshake (bytes after the request are not frames)"
            self._events.append(FrameError(ErrorCode.BAD_REQUEST, reason, fatal=True))
            self._failed = True
            return
        path, query = _split_target(request.path)
        if path != self._options.path:
            response = protocol.reject(http.HTTPStatus.NOT_FOUND, "no WebSocket endpoint here\n")
        else:
            response = protocol.accept(request)
        protocol.send_response(response)
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            status = f"{response.status_code} {response.reason_phrase}"
            reason = f"WebSocket handshake refused ({status})"
            self._events.append(FrameError(ErrorCode.BAD_REQUEST, reason, fatal=True))
            self._failed = True
            return
        tokens = parse_qs(query).get("token")
        self._url_token = tokens[0] if tokens else None
        # websockets' parser keeps the request for the connection's whole life (a
        # local of its generator): empty it, which halves what an idle WebSocket
        # costs and drops the URL's token from memory.
        request.headers.clear()
        request.path = ""

    def _frame(self, frame: WsFrame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT:
            if frame.fin:
                self._message(bytes(frame.data))
            else:
                self._fragments = bytearray(frame.data)
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments += frame.data  # bounded: websockets counts the message size
            if frame.fin:
                message, self._fragments = bytes(self._fragments), None
                self._message(message)
        elif opcode is Opcode.BINARY:
            binary = "binary messages are not supported"
            self._fail(ErrorCode.BAD_FRAME, CloseCode.UNSUPPORTED_DATA, binary)
        # PING is answered by websockets, PONG only proves the peer is there, CLOSE
        # is echoed by websockets (which then wants the TCP connection closed).

    def _message(self, payload: bytes) -> None:
        if not payload.isascii():
            try:
                payload.decode()
            except UnicodeDecodeError:
                not_utf8 = "text message is not valid UTF-8"
                self._fail(ErrorCode.BAD_FRAME, CloseCode.INVALID_DATA, not_utf8)
                return
        self._events.append(Frame(payload))

    def _fail(self, code: ErrorCode, close_code: int, message: str) -> None:
        """End the connection without waiting for the peer: `bye`, close frame, TCP close."""
        self._protocol.fail(close_code, message)
        self._hold_close()
        self._events.append(FrameError(code, message, fatal=True))

    def _peer_failed(self, exc: Exception) -> None:
        """websockets refused the peer's bytes and queued its close frame."""
        if isinstance(exc, EOFError):
            return  # the peer is gone: nobody to tell
        if isinstance(exc, PayloadTooBig):
            event = FrameError(
                ErrorCode.TOO_LARGE, f"message over {self.max_frame_bytes} bytes", fatal=True
            )
        elif isinstance(exc, ProtocolError):
            event = FrameError(ErrorCode.BAD_FRAME, f"WebSocket protocol error: {exc}", True)
        else:  # a close frame whose reason is not UTF-8
            event = FrameError(ErrorCode.BAD_FRAME, "invalid WebSocket close frame", True)
        self._hold_close()
        self._events.append(event)

    def _hold_close(self) -> None:
        self._failed = True
        self._held_close = [c for c in self._protocol.data_to_send() if c is not _SEND_EOF]

    def events_received(self) -> list[FrameEvent]:
        events, self._events = self._events, []
        return events

    # -- output ---------------------------------------------------------------------

    def send_frame(self, payload: bytes) -> bytes:
        """One text message; nothing before the handshake or after our close frame."""
        if self._held_close is None and self._protocol.state is not OPEN:
            return b""
        frame = WsFrame(Opcode.TEXT, payload)
        return frame.serialize(mask=False, extensions=self._protocol.extensions)

    def send_close(self, code: ErrorCode | None) -> None:
        """Start the closing handshake, with the close code that goes with `code`.

        After a protocol failure the close frame websockets chose (1002, 1003, 1007,
        1009) goes out instead. Before the handshake there is nothing to send.
        """
        if self._held_close is not None:
            self._out.extend(self._held_close)
            self._held_close = None
            return
        if self._protocol.state is OPEN:
            self._protocol.send_close(close_code_for(code), code.value if code else "")
            self._take_writes()

    def data_to_send(self) -> bytes:
        """Handshake response, pongs, pings, close frame: to write before anything else."""
        if not self._out:
            return b""
        out, self._out = self._out, []
        return b"".join(out)

    def _take_writes(self) -> None:
        for chunk in self._protocol.data_to_send():
            if chunk is not _SEND_EOF:
                self._out.append(chunk)

    # -- keepalive ------------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        """When `on_deadline` must run; the first call after the handshake starts the clock."""
        if self._protocol.state is not OPEN:
            return None
        if self._ping_at is None:
            self._ping_at = now + self._options.ping_interval_s
        if self._pong_due is not None:
            return min(self._ping_at, self._pong_due)
        return self._ping_at

    def on_deadline(self, now: float) -> None:
        """Ping the peer when due; a peer silent through a whole ping timeout is dead."""
        if not self.is_open or self._ping_at is None:
            return
        if self._pong_due is not None and now >= self._pong_due:
            if not self._heard:  # presumed dead: its close frame is not waited for
                silent = f"no answer to a ping in {self._options.ping_timeout_s:g} s"
                code = ErrorCode.IDLE_TIMEOUT
                self._fail(code, close_code_for(code), silent)
                return
            self._pong_due = None
        if self._pong_due is None and now >= self._ping_at:
            self._protocol.send_ping(b"")
            self._take_writes()
            self._heard = False
            self._pong_due = now + self._options.ping_timeout_s
            self._ping_at = now + self._options.ping_interval_s
