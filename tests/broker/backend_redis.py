"""The Redis backend of the contract suite, and key cleanup for Redis tests.

Tests share one Redis server: each works under its own prefix and removes its keys
afterwards (SCAN + UNLINK of `prefix:*`), never FLUSHDB.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from portao.broker.base import Broker, StateStore
from portao.broker.redis import RedisBroker
from portao.broker.redis_keys import Keys
from portao.config import Settings
from tests.conftest import REDIS_HOST, REDIS_PORT, require_service

SHARED_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


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
