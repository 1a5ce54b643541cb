"""The load generator's client connections: one `asyncio.Protocol` per socket.

A `Link` speaks a *dialect* (how requests are written and answers read) over a
*transport* (newline TCP, or WebSocket through websockets' sans-I/O client).
Portao's wire protocol v1 is one dialect; the Socket.IO peer comparison adds
another (`portao.bench.peer`). Answers become small `Answer` structs handed to a
`Sink`, the scenario running in this process. Call ids are integers local to
the link; calls made while a read is handled go out in one write.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import typing
from typing import Protocol
from urllib.parse import urlsplit

import msgspec
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from portao.wire.events import Frame
from portao.wire.framing import NewlineCodec

#: Linux's IP_BIND_ADDRESS_NO_PORT: bind the source address, pick the port at
#: connect time per destination, so each source address has the whole port range.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MAX_FRAME_BYTES = 1 << 20
SOURCE_ADDRESSES = 64


class Answer(msgspec.Struct):
    """What the load generator reads of a server message."""

    op: str
    id: int | str | None = None
    code: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")


class Said(msgspec.Struct):
    """The `data` of a fanout push: `chat.say`'s message, `text` is the send time."""

    text: str


_decode = msgspec.json.Decoder(Answer).decode
decode_said = msgspec.json.Decoder(Said).decode


class Sink(Protocol):
    """The scenario that receives a link's answers."""

    def completed(self, link: Link, started: float, now: float, code: str | None) -> None:
        """A call ended: `code` is None for a reply, the error code otherwise."""

    def pushed(self, link: Link, data: bytes, now: float) -> None:
        """A push arrived."""

    def lost(self, link: Link, code: str | None) -> None:
        """The connection ended (`code`: the server's `bye` code, if it sent one)."""


class Dialect:
    """Portao's wire protocol v1: how requests are written and answers read."""

    def auth(self, token: str) -> bytes:
        return b'{"op":"auth","token":"%s"}' % token.encode()

    def sub(self, room: str) -> bytes:
        return b'{"op":"sub","room":"%s"}' % room.encode()

    def ping(self) -> bytes:
        return b'{"op":"ping"}'

    def call(self, id: int, route: bytes, data: bytes) -> bytes:
        return b'{"op":"call","id":%d,"route":"%s","data":%s}' % (id, route, data)

    def answers(self, link: Link, payload: bytes) -> list[Answer]:
        try:
            return [_decode(payload)]
        except (msgspec.DecodeError, msgspec.ValidationError):
            return [Answer("error", code="bench: undecodable answer")]


PORTAO = Dialect()


class Link(asyncio.Protocol):
    """One client connection over newline-framed TCP."""

    __slots__ = (
        "_codec", "_next_id", "_out", "_sink", "_transport", "_waiter", "closed", "dialect",
        "pending",
    )

    def __init__(self, sink: Sink, dialect: Dialect = PORTAO) -> None:
        self._sink = sink
        self.dialect = dialect
        self._codec = NewlineCodec(MAX_FRAME_BYTES)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._next_id = 0
        self._out: list[bytes] | None = None  # messages made while answers are being read
        self.pending: dict[int, float] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._codec.receive_data(data)
        self.handle([e.payload for e in self._codec.events_received() if isinstance(e, Frame)])

    def handle(self, payloads: list[bytes]) -> None:
        """Dispatch answers; what the sink sends meanwhile goes out in one write."""
        now = time.time()
        sink = self._sink
        self._out = out = list[bytes]()
        for payload in payloads:
            for answer in self.dialect.answers(self, payload):
                op = answer.op
                if op == "reply" or (op == "error" and type(answer.id) is int):
                    started = self.pending.pop(answer.id, None)  # type: ignore[arg-type]
                    if started is not None:
                        sink.completed(self, started, now, answer.code)
                elif op == "push":
                    sink.pushed(self, bytes(answer.data), now)
                elif op == "bye":
                    self.close()
                    self._settle(answer)
                    sink.lost(self, answer.code)
                else:  # ok, pong, ack, errors without a call id
                    self._settle(answer)
        self._out = None
        if out:
            self.send_messages(out)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._sink.lost(self, None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def _settle(self, answer: Answer) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)

    async def request(self, message: bytes, timeout_s: float) -> Answer:
        """Send one non-call request (auth, sub, ping) and wait for its answer."""
        self._waiter = asyncio.get_running_loop().create_future()
        self.send_messages([message])
        async with asyncio.timeout(timeout_s):
            return await self._waiter

    def call(self, route: bytes, data: bytes, started: float) -> None:
        """Send a call; its latency counts from `started` (the intended send time)."""
        self._next_id += 1
        self.pending[self._next_id] = started
        message = self.dialect.call(self._next_id, route, data)
        if self._out is not None:
            self._out.append(message)  # written once, after the whole read is handled
        else:
            self.send_messages([message])

    def send_messages(self, messages: list[bytes]) -> None:
        self.write(b"\n".join(messages) + b"\n")

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close with RST: churn leaves no TIME_WAIT behind on the generator side."""
        self.closed = True
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.close()

    async def wait_open(self, timeout_s: float) -> None:
        """Until the link can carry messages (TCP: at once)."""


class WsLink(Link):
    """One client connection over WebSocket (websockets' sans-I/O client)."""

    __slots__ = ("_opened", "_protocol")

    def __init__(self, sink: Sink, dialect: Dialect, url: str) -> None:
        super().__init__(sink, dialect)
        self._protocol = ClientProtocol(parse_uri(url), max_size=MAX_FRAME_BYTES)
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._protocol.send_request(self._protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        protocol = self._protocol
        protocol.receive_data(data)
        texts = []
        for event in protocol.events_received():
            if isinstance(event, Response):
                if event.status_code == 101 and not self._opened.done():
                    self._opened.set_result(None)
            elif isinstance(event, WsFrame) and event.opcode is Opcode.TEXT:
                texts.append(bytes(event.data))
        self._flush()  # pongs and close frames the protocol queued
        if texts:
            self.handle(texts)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._opened.done():
            self._opened.set_exception(ConnectionError("closed during the handshake"))
        super().connection_lost(exc)

    async def wait_open(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self._opened

    def send_messages(self, messages: list[bytes]) -> None:
        for message in messages:
            self._protocol.send_text(message)
        self._flush()

    def _flush(self) -> None:
        for chunk in self._protocol.data_to_send():
            if chunk:
                self.write(chunk)


def source_address(host: str, index: int) -> str | None:
    """The source address of connection `index`: spread over 127.0.0.2.. on loopback."""
    if not host.startswith("127."):
        return None
    return f"127.0.0.{2 + index % SOURCE_ADDRESSES}"


async def open_link(
    url: str, source: str | None, sink: Sink, dialect: Dialect, timeout_s: float
) -> Link:
    """Connect from `source` (any port) to `url` (tcp://, ws://) and wait until open."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (host, port))
        factory: typing.Callable[[], Link]
        if parts.scheme == "tcp":
            factory = lambda: Link(sink, dialect)  # noqa: E731
        else:
            factory = lambda: WsLink(sink, dialect, url)  # noqa: E731
        _, link = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        await link.wait_open(timeout_s)
    except BaseException:
        link.close()
        raise
    return link
