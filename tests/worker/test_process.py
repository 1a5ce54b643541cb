"""A real `portao worker` process on the shared Redis, the test acting as the gateway."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from portao.config import Settings
from portao.errors import UnknownRoute
from tests.broker.backend_redis import SHARED_URL, open_backend
from tests.ops.admin import scrape, until
from tests.procs import free_port, processes, wait_exit
from tests.worker.harness import HandGateway

pytestmark = pytest.mark.redis

APP = "tests.worker.sleepy:app"
VISIBILITY_S = 1.0


async def metric(admin: str, name: str) -> float:
    return (await scrape(admin)).value(name)


async def publish_when_served(gw: HandGateway, route: str, data: object) -> None:
    """Publish once the worker has registered `route`."""

    async def published() -> bool:
        try:
            await gw.publish(route, data)
        except UnknownRoute:
            return False
        return True

    await until(published)


async def test_worker_frozen_past_its_claim_publishes_nothing(
    tmp_path: Path, prefix: str, make_settings: Callable[..., Settings]
) -> None:
    """SIGSTOP past the visibility timeout, the message reclaimed meanwhile, SIGCONT:
    the handler finishes, and its reply is dropped, not published."""
    settings = make_settings(visibility_timeout_s=VISIBILITY_S)
    async with open_backend(settings) as (broker, _):
        gw = HandGateway(broker)
        await gw.open()
        env = {"prefix": prefix, "broker": SHARED_URL, "visibility_timeout_s": str(VISIBILITY_S)}
        with processes(tmp_path, **env) as procs:
            port = free_port()
            admin = f"http://127.0.0.1:{port}"
            worker = procs.worker(APP, "--admin", f"127.0.0.1:{port}")
            await publish_when_served(gw, "nap", 0.5)

            async def in_hand() -> bool:
                return await metric(admin, "portao_worker_in_flight") == 1

            await until(in_hand)
            worker.send_signal(signal.SIGSTOP)
            await asyncio.sleep(VISIBILITY_S + 0.5)  # the nap is over, the claim lapsed
            [taken] = await broker.fetch("thief", ["nap"], 1, 0)
            assert taken.deliveries == 2
            worker.send_signal(signal.SIGCONT)

            async def idle() -> bool:
                return await metric(admin, "portao_worker_in_flight") == 0

            await until(idle, timeout_s=5)
            await gw.nothing(0.3)
            scraped = await scrape(admin)
            assert scraped.value("portao_worker_lost_claims_total") == 1
            assert scraped.value("portao_worker_handled_total") == 0
            await broker.ack("thief", [taken])
            worker.send_signal(signal.SIGTERM)
            assert await wait_exit(worker, 10) == 0, procs.logs()
            logs = procs.logs()
            assert "INFO portao.worker: worker: app sleepy, routes nap, concurrency 100" in logs
            assert "INFO portao.worker: worker: shutting down" in logs
