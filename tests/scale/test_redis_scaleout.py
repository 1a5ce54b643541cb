"""Many gateways, many workers, one Redis: real processes, nothing lost.

Issue 3's scale-out tests: two gateways and two workers serve one room;
10,000 calls survive a worker killed with SIGKILL; a killed gateway's users
leave presence. The first two scenarios take the processes' settings, so the
RabbitMQ scale tests (`test_amqp_scaleout`) run them too.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from portao.client import Client, connect
from portao.errors import RequestError
from portao.session.auth import mint_token
from tests.broker.backend_redis import delete_prefix
from tests.conftest import REDIS_HOST, REDIS_PORT, require_service
from tests.procs import SECRET, Procs, free_port, processes, wait_exit

pytestmark = pytest.mark.redis

APP = "tests.apps.scale:app"
BROKER = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture(autouse=True)
async def _redis(prefix: str) -> AsyncIterator[None]:
    """Redis must be there; the test's keys are removed afterwards."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    yield
    await delete_prefix(f"redis://{REDIS_HOST}:{REDIS_PORT}/0", prefix)


def token(user: str) -> str:
    return mint_token(SECRET, user, rooms=["*"], now=time.time())


async def client(port: int, user: str) -> Client:
    return await connect(f"tcp://127.0.0.1:{port}", token=token(user))


def two_gateways(procs: Procs) -> list[int]:
    """Start gateway0 and gateway1; their client ports."""
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        procs.gateway(port, name=f"gateway{i}")
    return ports


async def until_served(c: Client, timeout_s: float = 20.0) -> None:
    """Wait until a worker has registered the app's routes (and, on RabbitMQ, its
    just-declared queues take messages)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await c.call("echo", None)
            return
        except RequestError as exc:
            if exc.code not in ("unknown_route", "unavailable") or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_two_gateways_two_workers_chat(tmp_path: Path, prefix: str) -> None:
    await chat_across_gateways(tmp_path, broker=BROKER, prefix=prefix)


async def chat_across_gateways(tmp_path: Path, **settings: str) -> None:
    """Users on two gateways chat in one room served by two workers."""
    with processes(tmp_path, **settings) as procs:
        ports = two_gateways(procs)
        for i in range(2):
            procs.worker(APP, name=f"worker{i}")
        alice = await client(ports[0], "alice")
        bob = await client(ports[1], "bob")
        try:
            await until_served(alice)
            for c in (alice, bob):
                assert await c.call("chat.join", {"room": "lobby"}) == {
                    "room": "lobby",
                    "joined": True,
                }
            assert await alice.call("chat.who", {"room": "lobby"}) == ["alice", "bob"]
            assert await bob.call("chat.say", {"room": "lobby", "text": "hi"}) == {
                "delivered": True
            }
            for c in (alice, bob):
                push = await c.next_push(timeout_s=5)
                assert push.route == "chat.message"
                assert push.data == {"room": "lobby", "user": "bob", "text": "hi"}
            # push_user reaches a user on either gateway, from either worker
            for _ in range(4):
                assert await alice.call("poke", "bob") is True
                assert (await bob.next_push(timeout_s=5)).data == {"by": "alice"}
                assert await bob.call("poke", "alice") is True
                assert (await alice.next_push(timeout_s=5)).data == {"by": "bob"}
        finally:
            await alice.aclose()
            await bob.aclose()


@dataclass
class Calls:
    """How concurrent `work` calls ended, counted by the test, call by call."""

    answers: Counter[str] = field(default_factory=Counter)  # call key -> replies and errors
    wrong: list[tuple[str, object]] = field(default_factory=list)  # replies with other data
    errors: Counter[str] = field(default_factory=Counter)  # error code -> calls
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # set at every answer

    async def until_answered(self, count: int) -> None:
        while len(self.answers) < count:
            self.answered.clear()
            await self.answered.wait()


async def many_calls(
    clients: list[Client], each: int, disturb: Callable[[Calls], Awaitable[None]]
) -> Calls:
    """`each` concurrent calls on every client while `disturb(calls)` runs."""
    calls = Calls()

    async def one(c: Client, key: str) -> None:
        data = {"key": key, "sleep": 0.002}
        try:
            reply = await c.call("work", data, timeout_s=90)
        except RequestError as exc:
            calls.errors[exc.code] += 1
        else:
            if reply != data:
                calls.wrong.append((key, reply))
        calls.answers[key] += 1
        calls.answered.set()

    await asyncio.gather(
        disturb(calls), *(one(c, f"{i}:{n}") for i, c in enumerate(clients) for n in range(each))
    )
    return calls


async def test_ten_thousand_calls_survive_a_killed_worker(tmp_path: Path, prefix: str) -> None:
    await calls_survive_a_killed_worker(
        tmp_path, broker=BROKER, prefix=prefix, visibility_timeout_s="1", heartbeat_s="1",
        call_timeout_s="60",
    )


async def calls_survive_a_killed_worker(tmp_path: Path, **settings: str) -> None:
    """10,000 calls over two gateways; a worker in the midst of them is SIGKILLed and a
    new one started: every call is answered exactly once, with its own data."""
    with processes(tmp_path, **settings) as procs:
        ports = two_gateways(procs)
        victim = procs.worker(APP, name="victim")
        procs.worker(APP, name="survivor")
        clients = [await client(ports[i % 2], f"user{i}") for i in range(200)]
        await until_served(clients[0])

        async def killer(calls: Calls) -> None:
            # Killed in the midst: both workers busy, thousands of calls still queued.
            await calls.until_answered(1000)
            victim.send_signal(signal.SIGKILL)
            await asyncio.sleep(0.5)
            procs.worker(APP, name="replacement")

        try:
            calls = await many_calls(clients, 50, killer)
        finally:
            for c in clients:
                await c.aclose()
        assert victim.poll() == -signal.SIGKILL
        assert calls.wrong == []
        assert calls.errors == {}
        assert len(calls.answers) == 10_000, procs.logs()
        assert set(calls.answers.values()) == {1}


async def test_killed_gateway_users_leave_presence(tmp_path: Path, prefix: str) -> None:
    with processes(
        tmp_path, broker=BROKER, prefix=prefix, presence_ttl_s="2", heartbeat_s="0.5"
    ) as procs:
        ports = [free_port(), free_port()]
        doomed = procs.gateway(ports[0], name="doomed")
        procs.gateway(ports[1], name="steady")
        procs.worker(APP, name="worker")
        ghost = await client(ports[0], "ghost")
        alice = await client(ports[1], "alice")
        try:
            await until_served(alice)
            await ghost.call("chat.join", {"room": "lobby"})
            await alice.call("chat.join", {"room": "lobby"})
            assert await alice.call("chat.who", {"room": "lobby"}) == ["alice", "ghost"]
            doomed.send_signal(signal.SIGKILL)
            await wait_exit(doomed, 10)
            killed_at = time.monotonic()
            while await alice.call("chat.who", {"room": "lobby"}) != ["alice"]:
                assert time.monotonic() - killed_at < 2 + 3, "ghost still present"
                await asyncio.sleep(0.2)
            # push_user to the ghost goes nowhere and harms nothing
            assert await alice.call("poke", "ghost") is True
        finally:
            await ghost.aclose()
            await alice.aclose()


async def test_unknown_route_and_queueing_without_workers(tmp_path: Path, prefix: str) -> None:
    with processes(tmp_path, broker=BROKER, prefix=prefix) as procs:
        port = free_port()
        procs.gateway(port)
        alice = await client(port, "alice")
        try:
            with pytest.raises(RequestError) as info:
                await alice.call("echo", 1)
            assert info.value.code == "unknown_route"
            worker = procs.worker(APP, name="first")
            await until_served(alice)
            worker.send_signal(signal.SIGTERM)
            assert await wait_exit(worker, 20) == 0
            # no worker alive: calls queue and are answered once one comes back
            pending = asyncio.create_task(alice.call("echo", random.random(), timeout_s=30))
            await asyncio.sleep(0.5)
            assert not pending.done()
            procs.worker(APP, name="second")
            assert isinstance(await asyncio.wait_for(pending, 20), float)
        finally:
            await alice.aclose()
