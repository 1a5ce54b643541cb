"""What only the memory broker promises: caps, lazy expiry on its clock, no polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from portao.broker.base import Broker, Member, StateStore
from portao.broker.memory import MemoryBroker
from portao.config import Settings
from portao.envelope import Push, Reply
from portao.errors import BrokerUnavailable, UnknownRoute
from tests.broker.conftest import make_envelope

VISIBILITY_S, TTL_S = 1.0, 2.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        visibility_timeout_s=VISIBILITY_S,
        presence_ttl_s=TTL_S,
        heartbeat_s=0.5,
        max_queue_length=4,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def broker(settings: Settings, clock: FakeClock) -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker(settings, clock=clock, inbox_limit=5)
    await broker.connect()
    await broker.register_routes(["a", "b"])
    yield broker
    await broker.aclose()


@pytest.fixture
async def real_time_broker(settings: Settings) -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker(settings)
    await broker.connect()
    await broker.register_routes(["a", "b"])
    yield broker
    await broker.aclose()


def test_implements_both_protocols(settings: Settings) -> None:
    broker = MemoryBroker(settings)
    assert isinstance(broker, Broker)
    assert isinstance(broker, StateStore)


# -- link -------------------------------------------------------------------------------


async def test_connect_and_aclose_are_idempotent_and_closed_means_unavailable(
    settings: Settings,
) -> None:
    broker = MemoryBroker(settings)
    assert not broker.is_ready()
    with pytest.raises(BrokerUnavailable):
        await broker.register_routes(["a"])
    await broker.connect()
    await broker.connect()
    assert broker.is_ready()
    await broker.aclose()
    await broker.aclose()
    assert not broker.is_ready()
    with pytest.raises(BrokerUnavailable):
        await broker.once("k", 1.0)


async def test_aclose_wakes_waiting_fetch_and_read(real_time_broker: MemoryBroker) -> None:
    broker = real_time_broker
    await broker.open_inbox("gw-1")
    fetch = asyncio.create_task(broker.fetch("w1", ["a"], 10, 5.0))
    read = asyncio.create_task(broker.read_inbox("gw-1", 10, 5.0))
    await asyncio.sleep(0)
    started = time.monotonic()
    await broker.aclose()
    for task in (fetch, read):
        with pytest.raises(BrokerUnavailable):
            await task
    assert time.monotonic() - started < 0.1


# -- no polling ---------------------------------------------------------------------------


async def test_fetch_wakes_on_publish_within_milliseconds(real_time_broker: MemoryBroker) -> None:
    broker = real_time_broker
    fetch = asyncio.create_task(broker.fetch("w1", ["a", "b"], 10, 5.0))
    await asyncio.sleep(0)
    assert not fetch.done()
    started = time.monotonic()
    await broker.publish(make_envelope("b"))
    [delivery] = await fetch
    assert delivery.envelope.route == "b"
    assert time.monotonic() - started < 0.02


async def test_read_inbox_wakes_on_send_within_milliseconds(
    real_time_broker: MemoryBroker,
) -> None:
    broker = real_time_broker
    await broker.open_inbox("gw-1")
    read = asyncio.create_task(broker.read_inbox("gw-1", 10, 5.0))
    await asyncio.sleep(0)
    assert not read.done()
    started = time.monotonic()
    await broker.send_to_gateway("gw-1", Reply(ref="r", conn=1, data=b"1"))
    assert len(await read) == 1
    assert time.monotonic() - started < 0.02


async def test_a_waiting_fetch_wakes_when_a_claim_expires(
    make_settings: Callable[..., Settings],
) -> None:
    broker = MemoryBroker(make_settings(visibility_timeout_s=0.2))
    await broker.connect()
    await broker.register_routes(["a"])
    await broker.publish(make_envelope("a"))
    await broker.fetch("dead-worker", ["a"], 1, 0)
    started = time.monotonic()
    [delivery] = await broker.fetch("w2", ["a"], 1, 5.0)
    assert delivery.deliveries == 2
    assert 0.15 < time.monotonic() - started < 0.3
    await broker.aclose()


async def test_a_woken_then_cancelled_fetch_hands_the_wakeup_on(
    make_settings: Callable[..., Settings],
) -> None:
    broker = MemoryBroker(make_settings(visibility_timeout_s=30.0))
    await broker.connect()
    await broker.register_routes(["a"])
    first = asyncio.create_task(broker.fetch("w1", ["a"], 1, 5.0))
    second = asyncio.create_task(broker.fetch("w2", ["a"], 1, 5.0))
    await asyncio.sleep(0)
    await broker.publish(make_envelope("a"))  # wakes `first`...
    first.cancel()  # ...which never gets to take it
    async with asyncio.timeout(0.1):
        assert len(await second) == 1
    with pytest.raises(asyncio.CancelledError):
        await first
    await broker.aclose()


# -- queues -------------------------------------------------------------------------------


async def test_fetch_takes_routes_in_turn(broker: MemoryBroker) -> None:
    for route in ("a", "a", "a", "b"):
        await broker.publish(make_envelope(route))
    got = await broker.fetch("w1", ["a", "b"], 3, 0)
    assert sorted(d.envelope.route for d in got) == ["a", "a", "b"]


async def test_fetch_of_an_unregistered_route_is_unknown(broker: MemoryBroker) -> None:
    with pytest.raises(UnknownRoute):
        await broker.fetch("w1", ["nope"], 1, 0)


async def test_reclaim_follows_the_clock_and_the_claim_is_per_delivery(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    await broker.publish(make_envelope("a"))
    [first] = await broker.fetch("w1", ["a"], 1, 0)
    clock.advance(VISIBILITY_S - 0.01)
    assert await broker.fetch("w2", ["a"], 1, 0) == []
    clock.advance(0.01)
    assert await broker.extend("w1", [first]) == []  # expired, not yet taken: still held

    clock.advance(VISIBILITY_S)
    [again] = await broker.fetch("w1", ["a"], 1, 0)  # the same consumer, a new delivery
    assert again.deliveries == 2
    assert broker.stats.reclaimed == 1
    assert await broker.extend("w1", [first]) == [first]
    await broker.ack("w1", [first])  # the stale delivery: ignored
    assert await broker.extend("w1", [again]) == []
    await broker.ack("w1", [again])
    clock.advance(VISIBILITY_S * 2)
    assert await broker.fetch("w2", ["a"], 1, 0) == []


async def test_dead_letters_are_bounded(broker: MemoryBroker) -> None:
    for i in range(6):
        await broker.publish(make_envelope("a", str(i).encode()))
        [delivery] = await broker.fetch("w1", ["a"], 1, 0)
        await broker.dead_letter("w1", delivery, f"error {i}")
    kept = await broker.dead_letters("a")
    assert [d.error for d in kept] == ["error 2", "error 3", "error 4", "error 5"]
    assert broker.stats.dead_letters_overflow == 2
    assert await broker.dead_letters("never") == []


# -- inboxes and liveness -----------------------------------------------------------------


async def test_a_full_inbox_drops_its_oldest_messages(broker: MemoryBroker) -> None:
    await broker.open_inbox("gw-1")
    for i in range(8):
        await broker.send_to_gateway("gw-1", Reply(ref=str(i), conn=1, data=b"null"))
    got = await broker.read_inbox("gw-1", 100, 0)
    assert [m.ref for m in got] == ["3", "4", "5", "6", "7"]  # type: ignore[union-attr]
    assert broker.stats.inbox_overflow == 3


async def test_close_inbox_wakes_a_reader_and_later_reads_fail(
    real_time_broker: MemoryBroker,
) -> None:
    broker = real_time_broker
    await broker.open_inbox("gw-1")
    read = asyncio.create_task(broker.read_inbox("gw-1", 10, 5.0))
    await asyncio.sleep(0)
    await broker.close_inbox("gw-1")
    async with asyncio.timeout(0.1):
        assert await read == []
    with pytest.raises(BrokerUnavailable):
        await broker.read_inbox("gw-1", 10, 0)
    await broker.send_to_gateway("gw-1", Reply(ref="r", conn=1, data=b"1"))
    assert broker.stats.inbox_dropped == 1


async def test_gateway_expires_lazily_on_the_clock(broker: MemoryBroker, clock: FakeClock) -> None:
    member = Member("gw-1", 1, "alice")
    await broker.open_inbox("gw-1")
    await broker.bind_user("gw-1", "alice")
    await broker.bind_room("gw-1", "lobby")
    await broker.room_join("lobby", member)

    for _ in range(3):  # heartbeats carry it across several ttls
        clock.advance(TTL_S - 0.01)
        await broker.heartbeat("gw-1")
    clock.advance(TTL_S - 0.01)
    assert await broker.room_members("lobby") == [member]
    await broker.send_to_user("alice", Push(route="n", data=b"1", user="alice"))
    assert len(await broker.read_inbox("gw-1", 10, 0)) == 1

    clock.advance(0.01)
    assert await broker.room_members("lobby") == []
    await broker.publish_room("lobby", Push(route="n", data=b"1", room="lobby"))
    await broker.send_to_user("alice", Push(route="n", data=b"1", user="alice"))
    assert broker.stats.inbox_dropped == 0  # its bindings went with it: nothing to drop
    with pytest.raises(BrokerUnavailable):
        await broker.read_inbox("gw-1", 10, 0)


async def test_dead_gateways_take_no_new_bindings_or_members(broker: MemoryBroker) -> None:
    await broker.bind_user("gw-never", "alice")
    await broker.room_join("lobby", Member("gw-never", 1, "alice"))
    await broker.send_to_user("alice", Push(route="n", data=b"1", user="alice"))
    assert await broker.room_members("lobby") == []
    assert broker.stats.inbox_dropped == 0


async def test_heartbeat_sweeps_gateways_nobody_touches(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    await broker.open_inbox("gw-gone")
    await broker.bind_user("gw-gone", "alice")
    await broker.room_join("lobby", Member("gw-gone", 1, "alice"))
    clock.advance(TTL_S)
    await broker.heartbeat("gw-other")
    assert list(broker._gateways) == ["gw-other"]
    assert not broker._user_gateways
    assert not broker._members


async def test_once_expires_on_the_clock_and_forgets_old_keys(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    assert await broker.once("k", 5.0)
    clock.advance(4.99)
    assert not await broker.once("k", 5.0)
    clock.advance(0.01)
    assert await broker.once("k", 5.0)

    for i in range(100):
        assert await broker.once(f"old:{i}", 1.0)
    clock.advance(5.0)
    assert await broker.once("new", 1.0)
    assert list(broker._once) == ["new"]
