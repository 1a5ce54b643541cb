"""The load generator's side of wire protocol v1: one `asyncio.Protocol` per socket.

Requests are formatted straight into bytes (a call is one `%` and one `write`);
answers are decoded with msgspec into a small struct and handed to a `Sink`, the
scenario running in this process. Call ids are integers local to the link.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import typing
from typing import Protocol

import msgspec

from portao.wire.events import Frame
from portao.wire.framing import NewlineCodec

#: Linux's IP_BIND_ADDRESS_NO_PORT: bind the source address, pick the port at
#: connect time per destination, so each source address has the whole port range.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MAX_FRAME_BYTES = 1 << 20
SOURCE_ADDRESSES = 64


class Answer(msgspec.Struct):
    """What the load generator reads of a gateway message."""

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
        """The connection ended (`code`: the gateway's `bye` code, if it sent one)."""


class Link(asyncio.Protocol):
    """One client connection of the load generator."""

    __slots__ = (
        "_codec", "_next_id", "_out", "_sink", "_transport", "_waiter", "closed", "pending"
    )

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._codec = NewlineCodec(MAX_FRAME_BYTES)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._next_id = 0
        self._out: list[bytes] | None = None  # calls made while answers are being read
        self.pending: dict[int, float] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._codec.receive_data(data)
        now = time.time()
        sink = self._sink
        self._out = out = list[bytes]()
        for event in self._codec.events_received():
            if not isinstance(event, Frame):
                continue
            try:
                answer = _decode(event.payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                answer = Answer("error", code="bench: undecodable answer")
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
            self.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._sink.lost(self, None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def _settle(self, answer: Answer) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)

    async def request(self, payload: bytes, timeout_s: float) -> Answer:
        """Send one non-call request (auth, sub, ping) and wait for its answer."""
        self._waiter = asyncio.get_running_loop().create_future()
        self.write(payload)
        async with asyncio.timeout(timeout_s):
            return await self._waiter

    def call(self, route: bytes, data: bytes, started: float) -> None:
        """Send a call; its latency counts from `started` (the intended send time)."""
        self._next_id += 1
        self.pending[self._next_id] = started
        request = b'{"op":"call","id":%d,"route":"%s","data":%s}\n' % (self._next_id, route, data)
        if self._out is not None:
            self._out.append(request)  # written once, after the whole read is handled
        else:
            self.write(request)

    def write(self, payload: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(payload)

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


def source_address(host: str, index: int) -> str | None:
    """The source address of connection `index`: spread over 127.0.0.2.. on loopback."""
    if not host.startswith("127."):
        return None
    return f"127.0.0.{2 + index % SOURCE_ADDRESSES}"


async def open_link(
    host: str, port: int, source: str | None, sink: Sink, timeout_s: float
) -> Link:
    """Connect from `source` (any port) to the gateway."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (host, port))
        _, link = await loop.create_connection(lambda: Link(sink), sock=sock)
    except BaseException:
        sock.close()
        raise
    return link
