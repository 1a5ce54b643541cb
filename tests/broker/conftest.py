"""The `backend` fixture: one contract suite, every broker.

`backend` is parametrized over memory, redis and amqp. The memory backend is built
here; each other one comes from `tests/broker/backend_<name>.py`, which exposes

    def open_backend(settings: Settings) -> AbstractAsyncContextManager[tuple[Broker, StateStore]]

an async context manager that connects, yields (broker, state), and removes what it
created (keys, queues, vhost). A backend whose module is not written yet is skipped.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest

from portao.broker.base import Broker, Delivery, StateStore
from portao.broker.memory import MemoryBroker
from portao.config import Settings
from portao.envelope import Envelope, InboxMessage, Kind, new_message_id
from tests.conftest import AMQP_HOST, AMQP_PORT, REDIS_HOST, REDIS_PORT, require_service

#: Short timings, so waits past a timeout stay well under a second.
CONTRACT_SETTINGS = {
    "visibility_timeout_s": 0.5,
    "presence_ttl_s": 1.0,
    "heartbeat_s": 0.2,
    "max_queue_length": 10,
}

OpenBackend = Callable[[Settings], AbstractAsyncContextManager[tuple[Broker, StateStore]]]


@dataclass(frozen=True, slots=True)
class Backend:
    """What a contract test gets: the broker, its state store, and their settings."""

    name: str
    broker: Broker
    state: StateStore
    settings: Settings


@asynccontextmanager
async def open_memory_backend(settings: Settings) -> AsyncIterator[tuple[Broker, StateStore]]:
    broker = MemoryBroker(settings)
    await broker.connect()
    try:
        yield broker, broker
    finally:
        await broker.aclose()


def _opener(name: str) -> OpenBackend:
    if name == "memory":
        return open_memory_backend
    if name == "redis":
        require_service("Redis", REDIS_HOST, REDIS_PORT)
    else:
        require_service("RabbitMQ", AMQP_HOST, AMQP_PORT)
    module = f"tests.broker.backend_{name}"
    if importlib.util.find_spec(module) is None:
        pytest.skip("backend module not built yet")
    opener: OpenBackend = importlib.import_module(module).open_backend
    return opener


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("amqp", marks=pytest.mark.amqp),
    ]
)
async def backend(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Backend]:
    """A connected backend with CONTRACT_SETTINGS and this test's unique prefix."""
    name: str = request.param
    settings = make_settings(**CONTRACT_SETTINGS)
    async with _opener(name)(settings) as (broker, state):
        yield Backend(name, broker, state, settings)


# -- helpers for the suites ---------------------------------------------------------


def make_envelope(
    route: str, data: bytes = b"null", *, kind: Kind = "call", gateway: str = "gw-test"
) -> Envelope:
    """An envelope as a gateway would publish it."""
    return Envelope(
        id=new_message_id(),
        kind=kind,
        route=route,
        user="alice",
        gateway=gateway,
        conn=1,
        deadline=None,
        data=data,
    )


async def fetch_n(
    broker: Broker, consumer: str, routes: Sequence[str], count: int, within_s: float = 3.0
) -> list[Delivery]:
    """Fetch until `count` deliveries arrived or `within_s` passed (then fewer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    got: list[Delivery] = []
    while len(got) < count and (remaining := deadline - loop.time()) > 0:
        got += await broker.fetch(consumer, routes, count - len(got), remaining)
    return got


async def read_n(
    broker: Broker, gateway_id: str, count: int, within_s: float = 3.0
) -> list[InboxMessage]:
    """Read the inbox until `count` messages arrived or `within_s` passed (then fewer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    got: list[InboxMessage] = []
    while len(got) < count and (remaining := deadline - loop.time()) > 0:
        got += await broker.read_inbox(gateway_id, count - len(got), remaining)
    return got


async def beat(backend: Backend, gateway_id: str) -> None:
    """One heartbeat, as a gateway sends it: to the broker and to the state store."""
    await backend.broker.heartbeat(gateway_id)
    if backend.state is not backend.broker:
        await backend.state.heartbeat(gateway_id)
