"""Listener URLs: parse them and open the servers.

`tcp://H:P` (newline JSON) and `tcp+len://H:P` (length-prefixed JSON). Every
accepted socket gets TCP keepalive (30 s idle, 10 s interval, 3 probes) so dead
peers are found even when the application idle timeout is off.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from portao.errors import ConfigError
from portao.wire.framing import FrameCodec, LengthPrefixCodec, NewlineCodec

KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
ACCEPT_BACKLOG = 4096

_FRAMINGS: dict[str, Callable[[int], FrameCodec]] = {
    "tcp": NewlineCodec,
    "tcp+len": LengthPrefixCodec,
}


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """A parsed listener URL."""

    url: str
    scheme: str
    host: str
    port: int

    def codec_factory(self) -> Callable[[int], FrameCodec]:
        return _FRAMINGS[self.scheme]


def parse_listen(url: str) -> ListenSpec:
    """Parse a `--listen` URL; `ConfigError` names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in _FRAMINGS:
        known = ", ".join(f"{s}://" for s in _FRAMINGS)
        raise ConfigError(f"listen: unsupported scheme in {url!r} (supported: {known})")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"listen: bad port in {url!r}") from None
    if port is None or parts.hostname is None:
        raise ConfigError(f"listen: {url!r} needs HOST:PORT")
    return ListenSpec(url=url, scheme=parts.scheme, host=parts.hostname, port=port)


def set_keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with the brief's timings."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def open_server(
    spec: ListenSpec,
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    reuse_port: bool = False,
) -> asyncio.Server:
    """Start listening; `reuse_port` lets several processes share the port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        protocol_factory,
        spec.host,
        spec.port,
        backlog=ACCEPT_BACKLOG,
        reuse_address=True,
        reuse_port=reuse_port or None,
    )
