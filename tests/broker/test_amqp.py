"""What only RabbitMQ does: confirms, quorum-queue limits, dead letters, link loss.

The contract suite (test_contract.py) holds AmqpBroker to the shared semantics;
these tests cover the AMQP mechanics under them. Each server test has a vhost of its
own (tests/broker/backend_amqp.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiormq
import pytest

from portao.broker.amqp import AmqpBroker
from portao.broker.amqp_consumer import plan_acks
from portao.broker.amqp_link import LinkTimeouts, backoff_s
from portao.broker.amqp_topology import Topology
from portao.broker.base import DeadLetter
from portao.config import Settings
from portao.envelope import Push, Reply, new_gateway_id
from portao.errors import BrokerUnavailable, QueueFull, UnknownRoute
from tests.broker.backend_amqp import amqp_url, fresh_vhost, rabbitmqctl
from tests.broker.conftest import fetch_n, make_envelope, read_n
from tests.conftest import AMQP_HOST, AMQP_PORT

amqp = pytest.mark.amqp


@pytest.fixture
async def vhost() -> AsyncIterator[str]:
    async with fresh_vhost() as name:
        yield name


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        visibility_timeout_s=1.0, presence_ttl_s=2.0, heartbeat_s=0.5, max_queue_length=20
    )


@asynccontextmanager
async def connected(
    vhost: str, settings: Settings, port: int = AMQP_PORT
) -> AsyncIterator[AmqpBroker]:
    broker = AmqpBroker(amqp_url(vhost, port=port), settings)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.aclose()


async def wait_until(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    """Wait until `predicate()` holds (bounded)."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def close_connections(vhost: str) -> None:
    """The broker closes every client connection in `vhost`, as an operator would."""
    await rabbitmqctl("close_all_connections", "--vhost", vhost, "--limit", "100", "test")


# -- without a server -----------------------------------------------------------------


def test_plan_acks_uses_one_multiple_ack_for_the_leading_run() -> None:
    assert plan_acks({1, 2, 3, 4, 7}, [1, 2, 3, 7]) == (3, [7])
    assert plan_acks({1, 2, 3}, [3, 2, 1]) == (3, [])


def test_plan_acks_acks_singly_behind_a_gap_and_ignores_unknown_tags() -> None:
    assert plan_acks({1, 2, 3, 4}, [2, 4, 9]) == (None, [2, 4])
    assert plan_acks({5, 6}, [5]) == (None, [5])
    assert plan_acks({5, 6}, []) == (None, [])


def test_deliveries_count_returns_and_the_spent_queue_comes_after_the_limit() -> None:
    topology = Topology("p", max_queue_length=10, max_attempts=3, presence_ttl_s=15)
    assert topology.deliveries(None, spent=False) == 1
    assert topology.deliveries({"x-delivery-count": 2}, spent=False) == 3
    assert topology.deliveries({"x-death": []}, spent=True) == 5
    assert topology.route_queue_args("r")["x-delivery-limit"] == 3
    assert topology.route_queue_args("r")["x-max-length"] == 9  # quorum takes one more


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    timeouts = LinkTimeouts(backoff_min_s=0.1, backoff_max_s=2.0)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (10, 2.0)]:
        delays = {backoff_s(attempt, timeouts) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1


def test_heartbeat_follows_the_visibility_timeout_and_repr_hides_the_password(
    make_settings: Callable[..., Settings],
) -> None:
    assert LinkTimeouts.from_settings(make_settings()).heartbeat_s == 10
    broker = AmqpBroker("amqp://user:s3cret@127.0.0.1:5672/v", make_settings())
    assert "s3cret" not in repr(broker)
    assert "heartbeat=10" in repr(broker)


async def test_connect_fails_fast_without_a_server(settings: Settings) -> None:
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:1/", settings)
    with pytest.raises(BrokerUnavailable):
        await broker.connect()
    assert not broker.is_ready()
    with pytest.raises(BrokerUnavailable):
        await broker.publish(make_envelope("r"))
    await broker.aclose()


# -- publishing -----------------------------------------------------------------------


@asynccontextmanager
async def delayed_port(delay_s: float) -> AsyncIterator[int]:
    """A local port that relays to RabbitMQ with `delay_s` of latency each way."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, chunk = await chunks.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not chunk:
                    return
                writer.write(chunk)
                await writer.drain()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(forward())
            while chunk := await reader.read(65536):
                chunks.put_nowait((loop.time() + delay_s, chunk))
            chunks.put_nowait((loop.time() + delay_s, b""))

    sessions: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(AMQP_HOST, AMQP_PORT)
        directions = {
            asyncio.create_task(relay(reader, up_writer)),
            asyncio.create_task(relay(up_reader, writer)),
        }
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in directions:
                task.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
            for stream in (writer, up_writer):
                stream.close()
                with suppress(ConnectionError):
                    await stream.wait_closed()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = asyncio.create_task(serve(reader, writer))
        sessions.add(session)
        session.add_done_callback(sessions.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for session in list(sessions):
            session.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await server.wait_closed()


@amqp
async def test_confirms_are_pipelined(vhost: str, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_queue_length=10_000)
    async with (
        delayed_port(0.005) as port,
        connected(vhost, settings, port=port) as broker,
    ):
        await broker.register_routes(["far"])
        started = time.perf_counter()
        for _ in range(10):
            await broker.publish(make_envelope("far"))
        round_trip_s = (time.perf_counter() - started) / 10
        assert round_trip_s >= 0.01  # the relay adds 5 ms each way

        count = 500
        started = time.perf_counter()
        await asyncio.gather(*(broker.publish(make_envelope("far")) for _ in range(count)))
        elapsed_s = time.perf_counter() - started
    # One at a time would take `count` round trips; in flight together, a few.
    assert elapsed_s < count * round_trip_s / 10, (elapsed_s, round_trip_s)


@amqp
async def test_a_full_queue_refuses_and_takes_again_once_drained(
    vhost: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(max_queue_length=5)
    async with connected(vhost, settings) as broker:
        await broker.register_routes(["small"])
        for _ in range(5):
            await broker.publish(make_envelope("small"))
        with pytest.raises(QueueFull):
            await broker.publish(make_envelope("small"))
        await broker.ack("w", await fetch_n(broker, "w", ["small"], 5))
        await broker.publish(make_envelope("small"))


@amqp
async def test_unknown_routes_are_refused_on_publish_and_on_fetch(
    vhost: str, settings: Settings
) -> None:
    async with connected(vhost, settings) as broker:
        with pytest.raises(UnknownRoute):
            await broker.publish(make_envelope("nobody.serves.this"))
        with pytest.raises(UnknownRoute):
            await broker.fetch("w", ["nobody.serves.this"], 1, 0.1)
        await broker.register_routes(["served"])
        await broker.publish(make_envelope("served"))  # the link survived both


@amqp
async def test_a_channel_the_broker_closes_is_reopened_on_next_use(
    vhost: str, settings: Settings
) -> None:
    async with connected(vhost, settings) as broker:
        gateway_id = new_gateway_id()
        await broker.open_inbox(gateway_id)
        async with aiormq.connect(amqp_url(vhost)) as operator:
            channel = await operator.channel()
            await channel.exchange_delete(f"{settings.prefix}.rooms")
        with pytest.raises(BrokerUnavailable):  # 404: the broker closes the channel
            await broker.publish_room("lobby", Push(route="r", data=b"1", room="lobby"))
        reply = Reply(ref="m1", conn=1, data=b"1")
        await broker.send_to_gateway(gateway_id, reply)
        assert await read_n(broker, gateway_id, 1) == [reply]
        assert broker.is_ready()


@amqp
async def test_a_route_queue_declared_with_other_arguments_is_kept(
    vhost: str, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    async with connected(vhost, make_settings(max_queue_length=5)) as first:
        await first.register_routes(["r"])
    async with connected(vhost, make_settings(max_queue_length=50)) as second:
        with caplog.at_level(logging.WARNING, logger="portao.broker"):
            await second.register_routes(["r"])
        await second.publish(make_envelope("r"))
    assert "exists with other arguments" in caplog.text


# -- dead letters ---------------------------------------------------------------------


@amqp
async def test_the_delivery_limit_dead_letters_to_workers_who_answer_it(
    vhost: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(max_attempts=1)
    sent = make_envelope("crashy")
    async with connected(vhost, settings) as gateway:
        await gateway.register_routes(["crashy"])
        await gateway.publish(sent)
    for expected in (1, 2):  # a worker takes it and dies, twice
        async with connected(vhost, settings) as doomed:
            [delivery] = await fetch_n(doomed, "doomed", ["crashy"], 1)
            assert delivery.deliveries == expected
    async with connected(vhost, settings) as worker:
        [delivery] = await fetch_n(worker, "w", ["crashy"], 1)
        assert delivery.envelope == sent
        assert delivery.deliveries > settings.max_attempts  # the worker gives up on it
        await worker.dead_letter("w", delivery, "handler_error: delivered 3 times")
        assert await worker.dead_letters("crashy") == [
            DeadLetter(sent, "handler_error: delivered 3 times")
        ]
        assert await worker.fetch("w", ["crashy"], 10, 0.3) == []


@amqp
async def test_browsing_dead_letters_consumes_nothing_and_keeps_the_order(
    vhost: str, settings: Settings
) -> None:
    async with connected(vhost, settings) as broker:
        await broker.register_routes(["poison"])
        sent = [make_envelope("poison", str(i).encode()) for i in range(5)]
        for envelope in sent:
            await broker.publish(envelope)
        for i, delivery in enumerate(await fetch_n(broker, "w", ["poison"], 5)):
            await broker.dead_letter("w", delivery, f"error {i}")
        expected = [DeadLetter(e, f"error {i}") for i, e in enumerate(sent)]
        assert await broker.dead_letters("poison") == expected
        assert await broker.dead_letters("poison", limit=2) == expected[:2]
        assert await broker.dead_letters("poison") == expected
        assert await broker.dead_letters("never.registered") == []


# -- inboxes --------------------------------------------------------------------------


@amqp
async def test_an_inbox_keeps_replies_while_its_gateway_is_away_then_expires(
    vhost: str, settings: Settings
) -> None:
    gateway_id = new_gateway_id()
    reply = Reply(ref="m1", conn=1, data=b'"late"')
    async with connected(vhost, settings) as worker:
        async with connected(vhost, settings) as gateway:
            await gateway.open_inbox(gateway_id)
            await gateway.bind_user(gateway_id, "alice")
        await worker.send_to_gateway(gateway_id, reply)
        await worker.send_to_user("alice", reply)
        async with connected(vhost, settings) as gateway:  # back within the ttl
            await gateway.open_inbox(gateway_id)
            assert await read_n(gateway, gateway_id, 2) == [reply, reply]
        gone_since = time.monotonic()
        # Unused past the ttl, the broker deletes the inbox and its bindings. Probe
        # with mandatory publishes: a passive declare would count as a use.
        async with aiormq.connect(amqp_url(vhost)) as operator:
            channel = await operator.channel(publisher_confirms=True, on_return_raises=True)
            inbox = f"{settings.prefix}.inbox.{gateway_id}"
            async with asyncio.timeout(settings.presence_ttl_s * 3):
                while True:
                    try:
                        await channel.basic_publish(b"probe", routing_key=inbox, mandatory=True)
                    except aiormq.exceptions.PublishError:
                        break
                    await asyncio.sleep(0.1)
        assert time.monotonic() - gone_since >= settings.presence_ttl_s * 0.9


# -- link loss ------------------------------------------------------------------------


@amqp
async def test_forced_close_recovers_everything_and_loses_nothing(
    vhost: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(max_queue_length=10_000, visibility_timeout_s=2.0)
    async with connected(vhost, settings) as gateway, connected(vhost, settings) as worker:
        await worker.register_routes(["steady"])
        gateway_id = new_gateway_id()
        await gateway.open_inbox(gateway_id)
        await gateway.bind_user(gateway_id, "alice")
        await gateway.bind_room(gateway_id, "lobby")
        accepted: set[str] = set()
        received: set[str] = set()
        downs = 0
        stop = asyncio.Event()

        async def publish_steadily() -> None:
            while not stop.is_set():
                envelope = make_envelope("steady")
                try:
                    await gateway.publish(envelope)
                    accepted.add(envelope.id)
                except BrokerUnavailable:  # not accepted: a client would retry
                    await asyncio.sleep(0.01)

        async def consume_steadily() -> None:
            while not stop.is_set() or not accepted <= received:
                try:
                    got = await worker.fetch("w", ["steady"], 100, 0.2)
                    received.update(d.envelope.id for d in got)
                    await worker.ack("w", got)
                except BrokerUnavailable:
                    await asyncio.sleep(0.01)

        async def watch_readiness() -> None:
            nonlocal downs
            was_ready = True
            while not stop.is_set():
                ready = gateway.is_ready() and worker.is_ready()
                downs += was_ready and not ready
                was_ready = ready
                await asyncio.sleep(0.002)

        async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
            tasks.create_task(publish_steadily())
            tasks.create_task(watch_readiness())
            consumer = tasks.create_task(consume_steadily())
            await wait_until(lambda: len(accepted) > 50)
            await close_connections(vhost)
            await wait_until(lambda: downs > 0 and gateway.is_ready() and worker.is_ready())
            mark = len(accepted)
            await wait_until(lambda: len(accepted) > mark + 50)
            stop.set()
            await consumer  # ends once every accepted message was received

        # Consumers and bindings work again.
        push_user, push_room = Push("n", b"1", user="alice"), Push("n", b"2", room="lobby")
        await worker.send_to_user("alice", push_user)
        await worker.publish_room("lobby", push_room)
        assert await read_n(gateway, gateway_id, 2) == [push_user, push_room]


@amqp
async def test_a_held_delivery_is_lost_after_the_link_drops(vhost: str, settings: Settings) -> None:
    async with connected(vhost, settings) as broker:
        await broker.register_routes(["held"])
        await broker.publish(make_envelope("held"))
        [held] = await fetch_n(broker, "w", ["held"], 1)
        await close_connections(vhost)
        deadline = time.monotonic() + 5
        while await broker.extend("w", [held]) != [held]:  # its channel is gone
            assert time.monotonic() < deadline, "the claim outlived the connection"
            await asyncio.sleep(0.01)
        await wait_until(broker.is_ready)
        await broker.ack("w", [held])  # a stale tag: skipped, not sent
        [again] = await fetch_n(broker, "w", ["held"], 1)
        assert (again.envelope, again.deliveries) == (held.envelope, 2)
        await broker.ack("w", [again])


# -- broker restart -------------------------------------------------------------------


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
HAVE_SERVER = os.path.exists(RABBITMQ_SERVER)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class OwnNode:
    """A RabbitMQ node of this test's own on spare ports, killed at the end."""

    def __init__(self, base: Path) -> None:
        self.port, dist_port = _free_port(), _free_port()
        self._base = base
        shutil.copy(Path("/var/lib/rabbitmq/.erlang.cookie"), base / ".erlang.cookie")
        (base / ".erlang.cookie").chmod(0o400)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[].\n")
        self._env = {
            **os.environ,
            "HOME": str(base),
            "RABBITMQ_NODENAME": f"portao-test-{uuid.uuid4().hex[:8]}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
        }
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return amqp_url("", port=self.port)

    async def start(self) -> None:
        """Start the node and wait until it takes AMQP connections."""
        self._process = await asyncio.create_subprocess_exec(
            RABBITMQ_SERVER,
            env=self._env,
            stdout=subprocess.DEVNULL,  # the node logs under RABBITMQ_LOG_BASE
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                async with aiormq.connect(self.url):
                    return
            except (ConnectionError, OSError, aiormq.exceptions.AMQPError):
                assert self._process.returncode is None, "the node exited at start"
                assert time.monotonic() < deadline, "the node did not start in time"
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Stop the node as an operator's restart would (SIGTERM to the VM)."""
        assert self._process is not None
        os.kill(self._beam_pid(), signal.SIGTERM)
        await self._process.wait()  # the start script exits with its VM
        self._process = None

    def _beam_pid(self) -> int:
        return int((self._base / "pid").read_text().strip())

    async def kill(self) -> None:
        """SIGKILL whatever is left of the node (teardown)."""
        if self._process is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        await self._process.wait()
        self._process = None


@pytest.fixture
async def own_node(tmp_path: Path) -> AsyncIterator[OwnNode]:
    if not HAVE_SERVER:
        pytest.skip("no rabbitmq-server to start a node of our own")
    node = OwnNode(tmp_path)
    await node.start()
    try:
        yield node
    finally:
        await node.kill()


@amqp
@pytest.mark.slow
async def test_a_restarted_broker_comes_back_with_every_confirmed_message(
    own_node: OwnNode, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(max_queue_length=1000, presence_ttl_s=30.0, heartbeat_s=5.0)
    broker = AmqpBroker(own_node.url, settings)
    await broker.connect()
    try:
        await broker.register_routes(["durable"])
        gateway_id = new_gateway_id()
        await broker.open_inbox(gateway_id)
        await broker.bind_user(gateway_id, "alice")
        sent = [make_envelope("durable") for _ in range(50)]
        await asyncio.gather(*(broker.publish(e) for e in sent))
        replies = [Reply(ref=f"m{i}", conn=i, data=b"1") for i in range(5)]
        for reply in replies:
            await broker.send_to_gateway(gateway_id, reply)

        await own_node.stop()
        await wait_until(lambda: not broker.is_ready())
        with pytest.raises(BrokerUnavailable):
            await broker.publish(make_envelope("durable"))

        await own_node.start()
        await wait_until(broker.is_ready, within_s=30)
        got = await fetch_n(broker, "w", ["durable"], len(sent), within_s=10)
        assert sorted(d.envelope.id for d in got) == sorted(e.id for e in sent)
        await broker.ack("w", got)
        assert await read_n(broker, gateway_id, len(replies)) == replies
        push = Push("n", b"1", user="alice")
        await broker.send_to_user("alice", push)
        assert await read_n(broker, gateway_id, 1) == [push]
    finally:
        await broker.aclose()
