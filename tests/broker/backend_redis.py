"""The Redis backend of the contract suite, and key cleanup for Redis tests.

Tests share one Redis server: each works under its own prefix and removes its keys
afterwards (SCAN + UNLINK of `prefix:*`), never FLUSHDB.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from redis.asyncio import Redis

from portao.broker.base import Broker, StateStore
from portao.broker.redis import RedisBroker
from portao.broker.redis_keys import Keys
from portao.config import Settings
from tests.conftest import REDIS_HOST, REDIS_PORT, require_service

SHARED_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
#: Command timeout of the brokers on a `RedisServer` (URL `socket_timeout`).
TIMEOUT_S = 0.5


async def delete_prefix(url: str, prefix: str) -> int:
    """Unlink every key under `prefix`; returns how many there were."""
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=Keys(prefix).pattern, count=1000)]
        for start in range(0, len(keys), 500):
            await client.unlink(*keys[start : start + 500])
        return len(keys)
    finally:
        await client.aclose()


@asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[tuple[Broker, StateStore]]:
    """A RedisBroker on the shared server, as (broker, state); its keys removed after."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    broker = RedisBroker(SHARED_URL, settings)
    await broker.connect()
    try:
        yield broker, broker
    finally:
        await broker.aclose()
        await delete_prefix(SHARED_URL, settings.prefix)


class RedisServer:
    """A redis-server of this test's own, on a spare port, with AOF always."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?socket_timeout={TIMEOUT_S}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory),
             "--logfile", str(self.directory / "redis.log")],
        )  # fmt: skip
        deadline = time.monotonic() + 10.0
        while not self._answers():
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: a clean shutdown, the AOF flushed."""
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=10)

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        """Started; killed on leaving, whatever happened."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
