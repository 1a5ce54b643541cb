"""Listener URLs: parse them and open the servers.

    tcp://H:P      newline JSON            tls://H:P       the same over TLS
    tcp+len://H:P  length-prefixed JSON    tls+len://H:P   the same over TLS
    ws://H:P/path  WebSocket               wss://H:P/path  the same over TLS

TLS listeners share one certificate (`tls_cert` / `tls_key`). Every accepted socket
gets TCP keepalive (30 s idle, 10 s interval, 3 probes) so dead peers are found even
when the application idle timeout is off. A TLS handshake must finish within
`auth_timeout_s` of the accept, the same budget as authentication (the session's
auth deadline also counts from the accept).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from portao.config import Settings
from portao.errors import ConfigError
from portao.wire.framing import STREAM_CODECS, FrameCodec
from portao.wire.websocket import WebSocketCodec, WsOptions

KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
ACCEPT_BACKLOG = 4096

_WEBSOCKET_SCHEMES = ("ws", "wss")
_TLS_SCHEMES = ("tls", "tls+len", "wss")
SCHEMES = (*STREAM_CODECS, *_WEBSOCKET_SCHEMES)


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """A parsed listener URL, with what it needs to open: TLS context, WebSocket options."""

    url: str
    scheme: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    tls_handshake_timeout_s: float | None = None
    websocket: WsOptions | None = None

    def codec_factory(self) -> Callable[[int], FrameCodec]:
        if self.websocket is not None:
            return functools.partial(WebSocketCodec, options=self.websocket)
        return STREAM_CODECS[self.scheme]


def parse_listen(url: str, settings: Settings | None = None) -> ListenSpec:
    """Parse a `--listen` URL; `ConfigError` names what is wrong.

    TLS schemes need `settings` with `tls_cert` and `tls_key`; without settings a
    WebSocket listener takes every origin and no compression.
    """
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"listen: unsupported scheme in {url!r} (supported: {known})")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"listen: bad port in {url!r}") from None
    if port is None or parts.hostname is None:
        raise ConfigError(f"listen: {url!r} needs HOST:PORT")
    websocket = None
    if parts.scheme in _WEBSOCKET_SCHEMES:
        websocket = _ws_options(parts.path or "/", settings)
    elif parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"listen: {url!r}: only ws:// and wss:// take a path")
    context = timeout_s = None
    if parts.scheme in _TLS_SCHEMES:
        if settings is None or settings.tls_cert is None or settings.tls_key is None:
            raise ConfigError(f"listen: {url!r} needs --tls-cert and --tls-key")
        context = server_tls_context(settings.tls_cert, settings.tls_key)
        timeout_s = settings.auth_timeout_s
    return ListenSpec(
        url=url,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        ssl_context=context,
        tls_handshake_timeout_s=timeout_s,
        websocket=websocket,
    )


def _ws_options(path: str, settings: Settings | None) -> WsOptions:
    # `ws_origins` / `ws_compression` are read only where Settings has them.
    origins = getattr(settings, "ws_origins", None) or ()
    compression = bool(getattr(settings, "ws_compression", False))
    return WsOptions(path=path, origins=tuple(origins), compression=compression)


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2+) with the certificate chain and its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key: cannot load {cert} and {key}: {exc}") from None
    return context


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
        ssl=spec.ssl_context,
        ssl_handshake_timeout=spec.tls_handshake_timeout_s,
    )
