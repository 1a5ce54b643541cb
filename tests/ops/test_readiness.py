"""`/readyz` follows the broker link: a Redis server of the test's own goes away and back."""

from __future__ import annotations

from pathlib import Path

import pytest

from portao.admin.metrics import build_registry
from portao.broker.factory import create_broker, create_state
from portao.config import Settings
from portao.gateway.server import Gateway
from portao.runtime import start_admin
from portao.session.auth import TokenVerifier
from tests.broker.backend_redis import RedisServer
from tests.ops.admin import scrape, status_is, until

pytestmark = pytest.mark.redis


async def test_readyz_flips_when_the_broker_goes_away_and_back(
    tmp_path: Path, prefix: str
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    settings = Settings(
        prefix=prefix, jwt_secret="x" * 32, listen=["tcp://127.0.0.1:0"], admin="127.0.0.1:0",
    )
    broker = create_broker(server.url, settings)
    state = create_state(server.url, settings, broker)
    gateway = Gateway(settings, broker, state, TokenVerifier.from_settings(settings))
    try:
        await gateway.start()

        async def ready() -> bool:
            return gateway.is_ready()

        registry = build_registry(gateway=gateway, brokers=[broker])
        admin = await start_admin(settings, registry, ready)
        assert admin is not None
        base = f"http://127.0.0.1:{admin.port}"
        try:
            assert await status_is(base + "/readyz", 200)
            server.stop()
            await until(lambda: status_is(base + "/readyz", 503))
            assert (await scrape(base)).value("portao_broker_up") == 0
            assert await status_is(base + "/healthz", 200)  # alive, only not ready
            server.start()
            await until(lambda: status_is(base + "/readyz", 200))
            assert (await scrape(base)).value("portao_broker_up") == 1
        finally:
            await admin.aclose()
    finally:
        await gateway.drain()
        await gateway.aclose()
        server.kill()

