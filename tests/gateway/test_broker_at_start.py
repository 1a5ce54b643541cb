"""A broker that is down when the gateway starts is an outage that began first.

The gateway listens anyway, reports `/readyz` false, answers new work `unavailable`,
and attaches by itself (backoff and jitter) once the broker appears. A RabbitMQ
refusal is logged in the broker's words, and each link up is logged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from portao.broker.amqp import AmqpBroker
from portao.broker.redis import RedisBroker
from portao.config import Settings
from portao.errors import BrokerUnavailable
from portao.gateway.server import Gateway
from portao.session.auth import TokenVerifier, mint_token
from tests.broker.backend_amqp import VHOSTS, amqp_url, rabbitmqctl
from tests.broker.backend_redis import SHARED_URL, RedisServer, delete_prefix
from tests.conftest import AMQP_HOST, AMQP_PORT, REDIS_HOST, REDIS_PORT, require_service
from tests.gateway.conftest import RawClient
from tests.ops.admin import status_is, until
from tests.procs import SECRET, free_port, processes, wait_exit


@pytest.mark.redis
async def test_redis_down_at_start_then_up(tmp_path: Path, prefix: str) -> None:
    """`portao gateway --broker redis://…` with nothing there: serves, not ready, then ready."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")  # its port stays closed until start()
    port, admin = free_port(), free_port()
    try:
        with processes(tmp_path, broker=server.url, prefix=prefix) as procs:
            gateway = procs.gateway(port, "--admin", f"127.0.0.1:{admin}")
            readyz = f"http://127.0.0.1:{admin}/readyz"
            await until(lambda: status_is(readyz, 503))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client = RawClient(reader, writer, "tcp")
            token = mint_token(SECRET, "alice", now=time.time())
            assert await client.request({"op": "auth", "token": token}) == {
                "op": "ok", "user": "alice"
            }
            answer = await client.request({"op": "call", "id": 1, "route": "echo", "data": 1})
            assert (answer["id"], answer["code"]) == (1, "unavailable")
            server.start()
            await until(lambda: status_is(readyz, 200))
            # the broker answers now: a route no worker registered is unknown to it
            answer = await client.request({"op": "call", "id": 2, "route": "echo", "data": 1})
            assert (answer["id"], answer["code"]) == (2, "unknown_route")
            await client.aclose()
            gateway.send_signal(signal.SIGTERM)
            assert await wait_exit(gateway, 15) == 0
            logs = procs.logs()
    finally:
        server.kill()
    assert "cannot reach the broker; not ready" in logs
    assert "broker reached: inbox open, ready" in logs
    assert "could not remove the inbox" not in logs


@pytest.mark.amqp
@pytest.mark.redis
async def test_rabbitmq_vhost_missing_at_start_then_made(
    caplog: pytest.LogCaptureFixture, prefix: str
) -> None:
    """The refusal is logged in RabbitMQ's words; once the vhost exists the gateway is up."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    require_service("RabbitMQ", AMQP_HOST, AMQP_PORT)
    caplog.set_level(logging.INFO)
    vhost = f"portao-test-{uuid.uuid4().hex[:12]}"
    settings = Settings(prefix=prefix, jwt_secret="x" * 32, listen=["tcp://127.0.0.1:0"])
    broker = AmqpBroker(amqp_url(vhost), settings)
    state = RedisBroker(SHARED_URL, settings)
    gateway = Gateway(settings, broker, state, TokenVerifier.from_settings(settings))
    try:
        await gateway.start()
        assert not gateway.is_ready()
        await rabbitmqctl("add_vhost", vhost)
        await rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

        async def ready() -> bool:
            return gateway.is_ready()

        await until(ready)
    finally:
        await gateway.drain()
        await gateway.aclose()
        VHOSTS.give_back(vhost)
        await delete_prefix(SHARED_URL, prefix)
    text = caplog.text
    assert f"NOT_ALLOWED - vhost {vhost} not found" in text
    assert "Connection.Close object" not in text
    assert text.count(f"RabbitMQ link up (vhost {vhost})") == 1
    assert "could not remove the inbox" not in text


@pytest.mark.amqp
async def test_rabbitmq_login_refused_in_words(make_settings: Callable[..., Settings]) -> None:
    require_service("RabbitMQ", AMQP_HOST, AMQP_PORT)
    broker = AmqpBroker(f"amqp://guest:wrong@{AMQP_HOST}:{AMQP_PORT}/", make_settings())
    refusal = "failed: ACCESS_REFUSED - Login was refused"
    with pytest.raises(BrokerUnavailable, match=refusal) as refused:
        await broker.connect()
    assert "wrong" not in str(refused.value)
    await broker.aclose()
