"""Acting as a gateway by hand against a real broker: publish, read the inbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from portao.broker.base import Broker
from portao.broker.memory import MemoryBroker
from portao.config import Settings
from portao.envelope import Envelope, InboxMessage, Kind, new_gateway_id, new_message_id
from portao.worker import App, Worker

FAST = {"retry_delay_s": 0.05, "presence_ttl_s": 60.0}


class FakeClock:
    """The memory broker's clock, moved by the test: claims lapse without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class HandGateway:
    """The gateway's side of the broker, driven by a test."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.id = new_gateway_id()

    async def open(self) -> None:
        await self.broker.open_inbox(self.id)

    def envelope(
        self,
        route: str,
        data: Any = None,
        *,
        kind: Kind = "call",
        user: str = "alice",
        conn: int = 1,
        deadline: float | None = None,
    ) -> Envelope:
        if kind == "call" and deadline is None:
            deadline = time.time() + 30
        return Envelope(
            id=new_message_id(),
            kind=kind,
            route=route,
            user=user,
            gateway=self.id,
            conn=conn,
            deadline=deadline,
            data=msgspec.json.encode(data),
        )

    async def publish(self, route: str, data: Any = None, **fields: Any) -> Envelope:
        env = self.envelope(route, data, **fields)
        await self.broker.publish(env)
        return env

    async def read(self, count: int, timeout_s: float = 3.0) -> list[InboxMessage]:
        """Exactly the next `count` inbox messages, waiting up to `timeout_s`."""
        got: list[InboxMessage] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count and (left := deadline - time.monotonic()) > 0:
            got += await self.broker.read_inbox(self.id, count - len(got), left)
        assert len(got) == count, f"expected {count} inbox messages, got {got}"
        return got

    async def nothing(self, timeout_s: float = 0.1) -> None:
        """Assert the inbox stays empty for `timeout_s`."""
        got = await self.broker.read_inbox(self.id, 10, timeout_s)
        assert got == []


@asynccontextmanager
async def memory_broker(
    settings: Settings, clock: FakeClock | None = None
) -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker(settings, clock=clock or FakeClock())
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.aclose()


@asynccontextmanager
async def setup(
    make_settings: Callable[..., Settings],
    app: App,
    clock: FakeClock | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[MemoryBroker, HandGateway, Worker]]:
    """A broker with the app's routes registered, an open inbox, and a worker."""
    settings = make_settings(**{**FAST, **overrides})
    async with memory_broker(settings, clock) as broker:
        await broker.register_routes(app.routes)
        gateway = HandGateway(broker)
        await gateway.open()
        yield broker, gateway, Worker(app, broker, broker, settings, fetch_timeout_s=0.05)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """The worker running in the background; stopped (and drained) on exit."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        await worker.stop()
        await task


async def assert_settled(broker: MemoryBroker, clock: FakeClock, route: str) -> None:
    """Nothing left on `route`, even past every claim: all acked or dead-lettered.

    Moves the clock an hour on, so gateways expire too: call it last.
    """
    clock.advance(3600)
    assert await broker.fetch("checker", [route], 10, 0) == []
