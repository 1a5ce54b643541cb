"""What only the Redis backend does: batching, trimming, lost groups, outages, stalls.

Tests that stop, restart or freeze Redis run their own `redis-server` on a spare
port (AOF with `appendfsync always`, as production should); the others use the
shared server under their own prefix.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection

from portao.broker.redis import RedisBroker
from portao.broker.redis_keys import Keys
from portao.config import Settings
from portao.envelope import Push, Reply, new_gateway_id
from portao.errors import BrokerUnavailable, QueueFull, UnknownRoute
from tests.broker.backend_redis import SHARED_URL, TIMEOUT_S, RedisServer, delete_prefix
from tests.broker.conftest import fetch_n, make_envelope, read_n
from tests.conftest import require_service

pytestmark = pytest.mark.redis


async def until(condition: Callable[[], object], within_s: float = 10.0) -> None:
    """Wait for `condition` (polled; it may be async), failing after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
async def raw(private_redis: RedisServer) -> AsyncIterator[Redis]:
    """A plain client of the private server, to look at what the broker did."""
    client = Redis.from_url(f"redis://127.0.0.1:{private_redis.port}/0")
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def shared_raw(prefix: str) -> AsyncIterator[Redis]:
    """A plain client of the shared server; this test's keys are removed after."""
    require_service("Redis", "127.0.0.1", 6379)
    client = Redis.from_url(SHARED_URL)
    try:
        yield client
    finally:
        await client.aclose()
        await delete_prefix(SHARED_URL, prefix)


@pytest.fixture
async def open_broker() -> AsyncIterator[Callable[[str, Settings], RedisBroker]]:
    """Build brokers that are connected by the test and closed after it."""
    brokers: list[RedisBroker] = []

    def make(url: str, settings: Settings) -> RedisBroker:
        broker = RedisBroker(url, settings)
        brokers.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in brokers:
            await broker.aclose()


OpenBroker = Callable[[str, Settings], RedisBroker]


# -- batching -------------------------------------------------------------------------


async def test_concurrent_publishes_share_round_trips(
    private_redis: RedisServer,
    raw: Redis,
    open_broker: OpenBroker,
    make_settings: Callable[..., Settings],
) -> None:
    broker = open_broker(private_redis.url, make_settings(max_queue_length=10_000))
    await broker.connect()
    await broker.register_routes(["burst"])

    async def stats() -> tuple[int, int]:
        info = await raw.info("all")
        return info["total_reads_processed"], info.get("cmdstat_xadd", {}).get("calls", 0)

    count = 1000
    reads_before, xadds_before = await stats()
    await asyncio.gather(*(broker.publish(make_envelope("burst")) for _ in range(count)))
    reads_after, xadds_after = await stats()

    assert xadds_after - xadds_before == count
    # Each read event on the server is at most one request from one client: one per
    # publish without batching; a few per pipeline with it (plus the INFO calls).
    assert reads_after - reads_before < count / 20
    assert len(await fetch_n(broker, "w1", ["burst"], count)) == count


async def test_publishes_of_one_turn_are_one_script_call_that_keeps_their_order(
    private_redis: RedisServer,
    raw: Redis,
    open_broker: OpenBroker,
    make_settings: Callable[..., Settings],
) -> None:
    """Shares of a batched script (publish, send) merge into one call, in order: the
    first publishes of the turn take the room left in the queue, the rest are refused."""
    broker = open_broker(private_redis.url, make_settings(max_queue_length=6))
    await broker.connect()
    await broker.register_routes(["merge"])
    await broker.publish(make_envelope("merge"))  # the script is loaded; 5 places left
    envelopes = [make_envelope("merge", f"{i}".encode()) for i in range(8)]
    calls_before = (await raw.info("commandstats"))["cmdstat_evalsha"]["calls"]

    results = await asyncio.gather(
        *(broker.publish(envelope) for envelope in envelopes), return_exceptions=True
    )

    calls_after = (await raw.info("commandstats"))["cmdstat_evalsha"]["calls"]
    assert calls_after - calls_before == 1
    assert results[:5] == [None] * 5
    assert all(isinstance(result, QueueFull) for result in results[5:])
    got = await fetch_n(broker, "w1", ["merge"], 6)
    assert [d.envelope for d in got][1:] == envelopes[:5]


async def test_an_ack_inside_a_long_range_of_held_entries_finds_them_all(
    shared_raw: Redis, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    """The ack script asks for the held entries of a batch's id range at once, cut
    short past a limit; an entry beyond the cut is still found (and acked once)."""
    settings = make_settings(max_queue_length=10_000)
    keys = Keys(settings.prefix)
    broker = open_broker(SHARED_URL, settings)
    await broker.connect()
    await broker.register_routes(["wide"])
    await asyncio.gather(*(broker.publish(make_envelope("wide")) for _ in range(300)))
    held = await fetch_n(broker, "w1", ["wide"], 300)
    assert len(held) == 300

    # Two entries 300 apart: XPENDING over their range stops after 2 * 2 + 100 entries.
    await broker.ack("w1", [held[0], held[-1], held[-1]])

    assert await shared_raw.get(keys.backlog("wide")) == b"298"
    pending = await shared_raw.xpending(keys.queue("wide"), "workers")
    assert pending["pending"] == 298
    await broker.ack("w1", held[1:-1])
    assert await shared_raw.get(keys.backlog("wide")) == b"0"


async def test_a_refused_command_fails_alone_in_its_batch(
    private_redis: RedisServer, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    broker = open_broker(private_redis.url, make_settings())
    await broker.connect()
    link = broker._link
    results = await asyncio.gather(
        link.submit("SET", "a", b"1"),
        link.submit("NOSUCHCOMMAND"),
        link.submit("GET", "a"),
        return_exceptions=True,
    )
    assert results[0] == b"OK"
    assert isinstance(results[1], BrokerUnavailable)
    assert "NOSUCHCOMMAND" in str(results[1])
    assert results[2] == b"1"


# -- trimming -------------------------------------------------------------------------


async def test_minid_trim_never_drops_an_unfinished_entry(
    shared_raw: Redis, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    keys = Keys(settings.prefix)
    first = open_broker(SHARED_URL, settings)
    await first.connect()
    await first.register_routes(["t"])
    delivered = [make_envelope("t", str(i).encode()) for i in range(10)]
    for envelope in delivered:
        await first.publish(envelope)
    held = await fetch_n(first, "w1", ["t"], 10)
    waiting = [make_envelope("t", b"undelivered") for _ in range(3)]
    for envelope in waiting:
        await first.publish(envelope)

    # Acks with holes: 0-4 and 6 done, 5 and 7-9 pending, 3 undelivered.
    await first.ack("w1", held[:5] + held[6:7])  # the route's first ack trims
    left = [entry_id for entry_id, _ in await shared_raw.xrange(keys.queue("t"))]
    assert len(left) == 8
    assert left[0].decode() == held[5].handle.entry_id  # type: ignore[attr-defined]

    # A later trim (another process: no trim interval to wait out) keeps the undelivered.
    second = open_broker(SHARED_URL, settings)
    await second.connect()
    await second.ack("w1", [held[5], *held[7:]])
    assert await shared_raw.xlen(keys.queue("t")) == 3
    rest = await fetch_n(second, "w2", ["t"], 3)
    assert [d.envelope for d in rest] == waiting

    third = open_broker(SHARED_URL, settings)
    await third.connect()
    await third.ack("w2", rest)
    assert await shared_raw.xlen(keys.queue("t")) == 0
    assert await shared_raw.get(keys.backlog("t")) == b"0"


# -- vanished groups ------------------------------------------------------------------


async def test_a_deleted_stream_gets_its_group_back(
    shared_raw: Redis,
    open_broker: OpenBroker,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings()
    keys = Keys(settings.prefix)
    broker = open_broker(SHARED_URL, settings)
    await broker.connect()
    await broker.register_routes(["job"])
    await shared_raw.delete(keys.queue("job"))  # the stream and its group
    after = make_envelope("job")
    await broker.publish(after)  # XADD makes a stream without a group

    with caplog.at_level(logging.WARNING, logger="portao.broker"):
        [got] = await fetch_n(broker, "w1", ["job"], 1)
    assert got.envelope == after
    assert sum("consumer group missing" in r.message for r in caplog.records) == 1
    await broker.ack("w1", [got])
    assert await shared_raw.get(keys.backlog("job")) == b"0"


async def test_a_worker_blocked_on_a_deleted_stream_recovers(
    private_redis: RedisServer,
    raw: Redis,
    open_broker: OpenBroker,
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    broker = open_broker(private_redis.url, settings)
    await broker.connect()
    await broker.register_routes(["job"])
    blocked = asyncio.create_task(fetch_n(broker, "w1", ["job"], 1, within_s=5.0))

    async def is_blocked() -> bool:
        return bool((await raw.info("clients"))["blocked_clients"])

    await until(is_blocked)
    await raw.delete(Keys(settings.prefix).queue("job"))  # unblocks the reader: an error
    sent = make_envelope("job")
    await broker.publish(sent)
    assert [d.envelope for d in await blocked] == [sent]


async def test_a_wiped_prefix_is_rebuilt_by_the_worker(
    shared_raw: Redis, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    worker, gateway = open_broker(SHARED_URL, settings), open_broker(SHARED_URL, settings)
    await worker.connect()
    await gateway.connect()
    await worker.register_routes(["job"])
    await delete_prefix(SHARED_URL, settings.prefix)  # as a FLUSHDB would
    with pytest.raises(UnknownRoute):
        await gateway.publish(make_envelope("job"))

    # The worker's next read finds no group: it recreates it and registers again.
    fetching = asyncio.create_task(fetch_n(worker, "w1", ["job"], 1, within_s=5.0))
    await until(lambda: shared_raw.sismember(Keys(settings.prefix).routes, "job"))
    sent = make_envelope("job")
    await gateway.publish(sent)
    assert [d.envelope for d in await fetching] == [sent]


# -- dead workers -----------------------------------------------------------------------

DOOMED_WORKER = """
import asyncio, sys
from portao.broker.redis import RedisBroker
from portao.config import Settings

async def main():
    url, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    broker = RedisBroker(url, Settings(prefix=prefix, visibility_timeout_s=0.5))
    await broker.connect()
    got = []
    while len(got) < count:
        got += await broker.fetch("doomed", ["work"], count - len(got), 1.0)
    print(len(got), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_workers_entries_are_reclaimed(
    shared_raw: Redis, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(visibility_timeout_s=0.5)
    broker = open_broker(SHARED_URL, settings)
    await broker.connect()
    await broker.register_routes(["work"])
    sent = [make_envelope("work", str(i).encode()) for i in range(5)]
    for envelope in sent:
        await broker.publish(envelope)

    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED_WORKER, SHARED_URL, settings.prefix, str(len(sent)),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": "src"},
    )  # fmt: skip
    try:
        assert doomed.stdout is not None
        async with asyncio.timeout(30):
            assert (await doomed.stdout.readline()).strip() == b"5"
    finally:
        doomed.kill()
        await doomed.wait()

    got = await fetch_n(broker, "survivor", ["work"], len(sent), within_s=5.0)
    assert sorted(d.envelope.id for d in got) == sorted(e.id for e in sent)
    assert {d.deliveries for d in got} == {2}
    await broker.ack("survivor", got)


async def test_an_expired_claim_behind_live_ones_is_found(
    shared_raw: Redis, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    """Reclaim walks the whole pending list, not only its oldest few entries."""
    settings = make_settings(visibility_timeout_s=0.5)
    broker = open_broker(SHARED_URL, settings)
    await broker.connect()
    await broker.register_routes(["work"])
    for _ in range(40):
        await broker.publish(make_envelope("work"))
    live = await fetch_n(broker, "live", ["work"], 40)
    orphan = make_envelope("work")
    await broker.publish(orphan)
    await fetch_n(broker, "dead", ["work"], 1)

    found = []
    deadline = time.monotonic() + 6.0
    while not found and time.monotonic() < deadline:
        assert await broker.extend("live", live) == []
        found = await broker.fetch("survivor", ["work"], 1, 0.1)
    assert [d.envelope for d in found] == [orphan]


async def test_a_blocking_read_gives_back_what_exceeds_max_count(
    shared_raw: Redis, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    """Entries that arrived on several routes at once: the surplus goes back undelivered.

    Only a race between the non-blocking sweep and the blocking read brings this
    about, so the test calls the blocking read itself.
    """
    settings = make_settings(visibility_timeout_s=0.5)
    broker = open_broker(SHARED_URL, settings)
    await broker.connect()
    await broker.register_routes(["a", "b"])
    sent = [make_envelope("a"), make_envelope("b")]
    for envelope in sent:
        await broker.publish(envelope)
    deadline = asyncio.get_running_loop().time() + 1.0
    [taken] = await broker._block("w1", ["a", "b"], 1, 0.1, deadline)

    [back] = await fetch_n(broker, "w2", ["a", "b"], 1)
    assert {taken.envelope.id, back.envelope.id} == {e.id for e in sent}
    assert back.deliveries == 1
    await broker.ack("w1", [taken])
    await broker.ack("w2", [back])


# -- outages ------------------------------------------------------------------------------


async def test_redis_restart_raises_unavailable_then_resumes_without_loss(
    private_redis: RedisServer, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    broker = open_broker(private_redis.url, make_settings(visibility_timeout_s=0.5))
    await broker.connect()
    await broker.register_routes(["job"])
    gateway_id = new_gateway_id()
    await broker.open_inbox(gateway_id)
    await broker.bind_room(gateway_id, "lobby")
    accepted = [make_envelope("job", str(i).encode()) for i in range(20)]
    for envelope in accepted:
        await broker.publish(envelope)
    before = Reply(ref="before", conn=1, data=b"1")
    await broker.send_to_gateway(gateway_id, before)
    assert await read_n(broker, gateway_id, 1) == [before]

    private_redis.stop()
    with pytest.raises(BrokerUnavailable):
        await broker.publish(make_envelope("job"))
    assert not broker.is_ready()
    with pytest.raises(BrokerUnavailable):
        await broker.fetch("w1", ["job"], 10, 0.2)
    with pytest.raises(BrokerUnavailable):
        await broker.send_to_gateway(gateway_id, before)
    assert await broker.read_inbox(gateway_id, 10, 0.1) == []  # waits, does not fail

    private_redis.start()
    await until(broker.is_ready)
    got = await fetch_n(broker, "w1", ["job"], len(accepted))
    assert [d.envelope for d in got] == accepted
    await broker.ack("w1", got)
    after = Reply(ref="after", conn=1, data=b"2")
    await broker.send_to_gateway(gateway_id, after)
    assert await read_n(broker, gateway_id, 1) == [after]
    # Room pushes are at-most-once: a few may be lost until the channel is back.
    push = Push(route="note", data=b"3", room="lobby")
    received: list[object] = []
    for _ in range(50):
        await broker.publish_room("lobby", push)
        received = list(await broker.read_inbox(gateway_id, 10, 0.1))
        if received:
            break
    assert received == [push]


async def test_stalled_redis_calls_end_within_their_timeout(
    private_redis: RedisServer, open_broker: OpenBroker, make_settings: Callable[..., Settings]
) -> None:
    broker = open_broker(private_redis.url, make_settings())
    await broker.connect()
    await broker.register_routes(["job"])
    blocked = asyncio.create_task(broker.fetch("w1", ["job"], 10, 30.0))
    await asyncio.sleep(0.1)  # let it block on XREADGROUP before the stall

    private_redis.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.publish(make_envelope("job"))
        assert time.monotonic() - started < TIMEOUT_S + 0.5
        assert not broker.is_ready()
        with pytest.raises(BrokerUnavailable):
            await blocked  # its BLOCK plus the command timeout, not its 30 s
        assert time.monotonic() - started < 1.0 + 2 * TIMEOUT_S + 0.5
        for call in (
            broker.fetch("w1", ["job"], 1, 0.2),
            broker.once("k", 1.0),
            broker.heartbeat("gw-x"),
            broker.room_members("lobby"),
        ):
            t0 = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await call
            assert time.monotonic() - t0 < TIMEOUT_S + 0.5
    finally:
        private_redis.thaw()

    await until(broker.is_ready)
    second = make_envelope("job")
    await broker.publish(second)
    got = await fetch_n(broker, "w1", ["job"], 1)
    assert [d.envelope for d in got] == [second]


# -- URLs ------------------------------------------------------------------------------------


async def test_rediss_url_speaks_tls(
    private_redis: RedisServer, make_settings: Callable[..., Settings]
) -> None:
    """The URL goes to redis-py unchanged: rediss:// means TLS (this server has none)."""
    url = f"rediss://127.0.0.1:{private_redis.port}/0?socket_timeout={TIMEOUT_S}"
    broker = RedisBroker(url, make_settings())
    await broker.connect()
    try:
        assert not broker.is_ready()
        assert broker._link.client.connection_pool.connection_class is SSLConnection
        with pytest.raises(BrokerUnavailable):
            await broker.publish(make_envelope("any"))
    finally:
        await broker.aclose()
