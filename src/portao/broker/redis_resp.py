"""A bare RESP2 connection for the hot path: commands pipelined, replies parsed by hiredis.

redis-py costs tens of microseconds of Python per pipelined command (command
stack, per-argument encoding, a response callback each); here a batch is packed
by `hiredis.pack_command` into one write and its replies are read by one
`hiredis.Reader` as they arrive, straight into the caller's list. Replies are raw:
bytes, integers, lists, None, and `ReplyError` instances for error replies (never
raised: one failed command does not fail its batch).

The connection is opened like redis-py would open it for the same URL (TCP or a
Unix socket, TLS for `rediss://`, then AUTH, SELECT and CLIENT SETNAME as the URL
says). It knows nothing of timeouts: a caller that gives up on a batch must
`close()` the connection, since its replies would answer the next batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection

ReplyError = hiredis.ReplyError


class RespConnection(asyncio.Protocol):
    """One Redis connection; `execute` sends a batch and waits for all its replies."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        # (future, replies so far, replies expected) per batch in flight, oldest first.
        self._waiting: deque[tuple[asyncio.Future[list[Any]], list[Any], int]] = deque()
        self._lost: BaseException | None = None

    @classmethod
    async def open(cls, options: dict[str, Any], probe: Any) -> RespConnection:
        """Connect and handshake; `options` as `parse_url` gives them, `probe` an
        unconnected redis-py connection of the pool (for its TLS context)."""
        loop = asyncio.get_running_loop()
        path = options.get("path")
        if path is not None:
            _, connection = await loop.create_unix_connection(cls, path)
        else:
            ssl = probe.ssl_context.get() if isinstance(probe, SSLConnection) else None
            host = options.get("host", "localhost")
            _, connection = await loop.create_connection(
                cls, host, options.get("port", 6379), ssl=ssl,
                server_hostname=host if ssl is not None else None,
            )  # fmt: skip
        try:
            await connection.handshake(options)
        except BaseException:
            connection.close()
            raise
        return connection

    async def handshake(self, options: dict[str, Any]) -> None:
        commands: list[tuple[Any, ...]] = []
        password = options.get("password")
        if password is not None:
            username = options.get("username")
            commands.append(("AUTH", username, password) if username else ("AUTH", password))
        if options.get("db"):
            commands.append(("SELECT", options["db"]))
        if options.get("client_name"):
            commands.append(("CLIENT", "SETNAME", options["client_name"]))
        for reply in await self.execute(commands):
            if isinstance(reply, ReplyError):
                raise ConnectionError(f"redis refused the connection: {reply}")

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._lost is None

    def execute(self, commands: Sequence[Iterable[Any]]) -> asyncio.Future[list[Any]]:
        """Send `commands` in one write; the future holds their replies, in order."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not commands:
            future.set_result([])
            return future
        if self._transport is None or self._lost is not None:
            future.set_exception(ConnectionError("the redis connection is closed"))
            return future
        self._transport.write(b"".join([hiredis.pack_command(tuple(c)) for c in commands]))
        self._waiting.append((future, [], len(commands)))
        return future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(ConnectionError("the redis connection was closed"))

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's own class

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        try:
            while (reply := reader.gets()) is not False:
                if not waiting:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                future, replies, expected = waiting[0]
                replies.append(reply)
                if len(replies) == expected:
                    waiting.popleft()
                    if not future.done():
                        future.set_result(replies)
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionError(f"redis protocol error: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("redis closed the connection"))

    def _fail(self, error: BaseException) -> None:
        if self._lost is None:
            self._lost = error
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(ConnectionError(str(error) or type(error).__name__))
