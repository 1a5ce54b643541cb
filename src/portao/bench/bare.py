"""The bare uvloop reference: the least a Python server can do per echo.

An `asyncio.Protocol` on uvloop that splits lines, decodes each with msgspec and
answers `call` with a `reply` of the same data, `auth` with `ok` (no token check)
and `ping` with `pong`. No session, no broker, no worker: "% of bare uvloop" in
the comparison is portao's echo rate over this server's, measured in one run.
"""

from __future__ import annotations

import asyncio
import typing

import msgspec
import uvloop

from portao.bench.link import Answer

_decode = msgspec.json.Decoder(Answer).decode


class _Reply(msgspec.Struct, tag_field="op", tag="reply"):
    id: int | str | None
    data: msgspec.Raw


_encode = msgspec.json.Encoder().encode
_OK = b'{"op":"ok","user":"bare"}\n'
_PONG = b'{"op":"pong"}\n'


class BareEcho(asyncio.Protocol):
    """One connection of the bare echo server."""

    __slots__ = ("_buffer", "_transport")

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        out = []
        for line in lines:
            try:
                request = _decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if request.op == "call":
                out.append(_encode(_Reply(request.id, request.data)) + b"\n")
            elif request.op in ("auth", "sub"):
                out.append(_OK)
            elif request.op == "ping":
                out.append(_PONG)
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


async def serve(host: str, port: int) -> None:
    """Serve until cancelled (SIGINT/SIGTERM end the process)."""
    server = await asyncio.get_running_loop().create_server(
        BareEcho, host, port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main(host: str, port: int) -> None:
    uvloop.run(serve(host, port))
