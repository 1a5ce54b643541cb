"""Many gateways, many workers, one RabbitMQ: real processes, nothing lost.

Issue 4's scale-out tests, each in a vhost of its own with the state store on the
shared Redis under the test's prefix: the Redis scale tests' chat and killed-worker
scenarios over `amqp://`, and the test's own connections closed by the broker
(`rabbitmqctl close_connection`) in the midst of 10,000 calls; then, in one process,
the consumer restart onto a backlog that the last of those found stalling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from portao.config import Settings
from portao.errors import BrokerUnavailable
from tests.broker.backend_amqp import amqp_url, fresh_vhost, rabbitmqctl
from tests.broker.backend_redis import SHARED_URL, delete_prefix
from tests.broker.conftest import make_envelope
from tests.broker.test_amqp import close_connections, connected
from tests.conftest import REDIS_HOST, REDIS_PORT, require_service
from tests.procs import processes
from tests.scale.test_redis_scaleout import (
    APP,
    Calls,
    calls_survive_a_killed_worker,
    chat_across_gateways,
    client,
    many_calls,
    two_gateways,
    until_served,
)

pytestmark = [pytest.mark.amqp, pytest.mark.redis, pytest.mark.slow]

#: Gateway and worker processes each hold one AMQP connection.
PROCESSES = 4


@pytest.fixture
async def vhost(prefix: str) -> AsyncIterator[str]:
    """A vhost of the test's own; its state keys are removed from Redis afterwards."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    async with fresh_vhost() as name:
        yield name
    await delete_prefix(SHARED_URL, prefix)


def on_amqp(vhost: str, prefix: str, **settings: str) -> dict[str, str]:
    return {"broker": amqp_url(vhost), "state": SHARED_URL, "prefix": prefix, **settings}


def replied(calls: Calls) -> int:
    return len(calls.answers) - calls.errors.total()


async def connections(vhost: str) -> set[str]:
    """The pids of the broker's connections in `vhost`."""
    listed = await rabbitmqctl("list_connections", "pid", "vhost")
    rows = (line.split("\t") for line in listed.splitlines())
    return {row[0] for row in rows if len(row) == 2 and row[1] == vhost}


async def test_two_gateways_two_workers_chat(tmp_path: Path, vhost: str, prefix: str) -> None:
    await chat_across_gateways(tmp_path, **on_amqp(vhost, prefix))


async def test_ten_thousand_calls_survive_a_killed_worker(
    tmp_path: Path, vhost: str, prefix: str
) -> None:
    # visibility 1 s: heartbeat 2 s (a SIGKILLed worker's socket closes at once anyway)
    await calls_survive_a_killed_worker(
        tmp_path, **on_amqp(vhost, prefix, visibility_timeout_s="1", call_timeout_s="60")
    )


async def test_connections_closed_by_the_broker_recover_and_lose_nothing(
    tmp_path: Path, vhost: str, prefix: str
) -> None:
    """Every connection of the vhost is closed in the midst of 10,000 calls.

    What DESIGN.md §3 allows, and this test holds the processes to: every call ends in
    exactly one answer (3). A call the broker confirmed gets its own reply, however
    the outage cut its way (its reply waits in the durable inbox, a message a worker
    held is redelivered and its duplicate reply dropped at the gateway), so never
    `timeout` (4). A call whose publish the broker did not confirm is answered
    `unavailable` (1): the only error allowed. (Unconfirmed is not refused: such a
    call may still have reached its queue and run; its reply is then dropped.) Then
    every process has reconnected by itself and every client's next call succeeds.
    """
    settings = on_amqp(vhost, prefix, visibility_timeout_s="1", call_timeout_s="60")
    with processes(tmp_path, **settings) as procs:
        ports = two_gateways(procs)
        for i in range(2):
            procs.worker(APP, name=f"worker{i}")
        clients = [await client(ports[i % 2], f"user{i}") for i in range(200)]
        for c in clients[:2]:  # one on each gateway
            await until_served(c)
        before = await connections(vhost)
        assert len(before) == PROCESSES, before

        replied_before = 0

        async def close_all(calls: Calls) -> None:
            nonlocal replied_before
            await calls.until_answered(1000)
            await asyncio.gather(
                *(rabbitmqctl("close_connection", pid, "closed by the test") for pid in before)
            )
            replied_before = replied(calls)

        try:
            calls = await many_calls(clients, 50, close_all)
            # recovered by itself: every client's next call is answered
            await asyncio.gather(*(c.call("echo", i, timeout_s=10) for i, c in enumerate(clients)))
        finally:
            for c in clients:
                await c.aclose()
        assert calls.wrong == []
        assert len(calls.answers) == 10_000, procs.logs()
        assert set(calls.answers.values()) == {1}
        assert set(calls.errors) <= {"unavailable"}, (calls.errors, procs.logs())
        assert replied(calls) > replied_before  # answered after the closes too
        deadline = time.monotonic() + 10
        while len(after := await connections(vhost)) < PROCESSES:
            assert time.monotonic() < deadline, after
        assert len(after) == PROCESSES, after
        assert not after & before, (before, after)  # every process reconnected
        assert all(p.poll() is None for p in procs.started), procs.logs()


async def test_a_consumer_restarted_onto_a_backlog_hands_out_what_arrives_meanwhile(
    vhost: str, make_settings: Callable[..., Settings]
) -> None:
    """A fetch waits with its prefetch full when the link drops; what it held goes back,
    and the new channel delivers it while the consumer still consumes its other queues.
    The waiting fetch must hand those deliveries out (they once looked stale to it and
    were dropped unacked: the channel then held its whole prefetch for good)."""
    # a long claim, so the waiting fetch is not woken to release it meanwhile
    settings = make_settings(worker_concurrency=10, visibility_timeout_s=30.0)
    routes = ["a", "b", "c"]  # six queues: the first one's backlog arrives mid-start
    async with connected(vhost, settings) as broker:
        await broker.register_routes(routes)
        sent = [make_envelope("a") for _ in range(50)]
        for envelope in sent:
            await broker.publish(envelope)
        held = await broker.fetch("w", routes, 10, 5.0)
        assert len(held) == 10  # the prefetch is full: the next fetch waits
        got: set[str] = set()

        async def consume() -> None:
            while len(got) < len(sent):
                try:
                    batch = await broker.fetch("w", routes, 50, 5.0)
                except BrokerUnavailable:
                    await asyncio.sleep(0.05)
                    continue
                got.update(d.envelope.id for d in batch)
                await broker.ack("w", batch)

        async with asyncio.timeout(10), asyncio.TaskGroup() as tasks:
            consumer = tasks.create_task(consume())
            await asyncio.sleep(0.2)
            await close_connections(vhost)
            await consumer
        assert got == {e.id for e in sent}
