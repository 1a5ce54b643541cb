"""The RabbitMQ backend of the contract suite, and vhost helpers for AMQP tests.

Each test gets a vhost of its own, deleted after it. The management plugin is not
enabled on the shared server, so vhosts are made with `rabbitmqctl eval`, and every
CLI call starts an Erlang VM (~0.5 s). To keep that off the tests' clock, `VHOSTS`
makes the next test's vhost in the background while a test runs, and deletes the
finished tests' vhosts in that same call. The state store is a RedisBroker on the
shared Redis under the test's prefix (its keys removed after).
"""

from __future__ import annotations

import asyncio
import atexit
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from portao.broker.amqp import AmqpBroker
from portao.broker.base import Broker, StateStore
from portao.broker.redis import RedisBroker
from portao.config import Settings
from tests.broker.backend_redis import SHARED_URL, delete_prefix
from tests.conftest import AMQP_HOST, AMQP_PORT, REDIS_HOST, REDIS_PORT, require_service

CTL_TIMEOUT_S = 60.0


async def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl -q ARGS`; its output, or RuntimeError when it fails."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(CTL_TIMEOUT_S):
        out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {out.decode()}")
    return out.decode()


def _add(vhost: str) -> str:
    name = f'<<"{vhost}">>'
    return (
        f'ok = rabbit_vhost:add({name}, <<"guest">>), '
        "ok = rabbit_auth_backend_internal:set_permissions("
        f'<<"guest">>, {name}, <<".*">>, <<".*">>, <<".*">>, <<"guest">>)'
    )


def _delete(vhost: str) -> str:
    return f'rabbit_vhost:delete(<<"{vhost}">>, <<"guest">>)'


class VhostPool:
    """One vhost made ahead; finished ones deleted by the call that makes the next."""

    def __init__(self) -> None:
        self._ahead: tuple[str, subprocess.Popen[bytes]] | None = None
        self._finished: list[str] = []
        atexit.register(self.close)

    def _launch(self, add: list[str]) -> subprocess.Popen[bytes]:
        statements = [_add(v) for v in add] + [_delete(v) for v in self._finished]
        self._finished = []
        return subprocess.Popen(
            ["rabbitmqctl", "-q", "eval", ", ".join([*statements, "ok"]) + "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    async def take(self) -> str:
        """A vhost guest may use (waits only if the one made ahead is not ready)."""
        if self._ahead is None:
            vhost = f"portao-test-{uuid.uuid4().hex[:12]}"
            self._ahead = vhost, self._launch([vhost])
        vhost, process = self._ahead
        self._ahead = None
        out, _ = await asyncio.to_thread(process.communicate, timeout=CTL_TIMEOUT_S)
        if process.returncode != 0:
            raise RuntimeError(f"rabbitmqctl could not make vhost {vhost}: {out.decode()}")
        following = f"portao-test-{uuid.uuid4().hex[:12]}"
        self._ahead = following, self._launch([following])
        return vhost

    def give_back(self, vhost: str) -> None:
        """Delete `vhost` with the next background call (or at exit)."""
        self._finished.append(vhost)

    def close(self) -> None:
        if self._ahead is not None:
            vhost, process = self._ahead
            self._ahead = None
            process.communicate(timeout=CTL_TIMEOUT_S)
            self._finished.append(vhost)
        if self._finished:
            self._launch([]).communicate(timeout=CTL_TIMEOUT_S)


VHOSTS = VhostPool()


@asynccontextmanager
async def fresh_vhost() -> AsyncIterator[str]:
    """A vhost of this test's own, deleted afterwards."""
    require_service("RabbitMQ", AMQP_HOST, AMQP_PORT)
    vhost = await VHOSTS.take()
    try:
        yield vhost
    finally:
        VHOSTS.give_back(vhost)


def amqp_url(vhost: str, host: str = AMQP_HOST, port: int = AMQP_PORT) -> str:
    return f"amqp://guest:guest@{host}:{port}/{vhost}"


@asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[tuple[Broker, StateStore]]:
    """An AmqpBroker on a fresh vhost, with its state store."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    async with fresh_vhost() as vhost:
        broker = AmqpBroker(amqp_url(vhost), settings)
        state = RedisBroker(SHARED_URL, settings)
        await broker.connect()
        await state.connect()
        try:
            yield broker, state
        finally:
            await state.aclose()
            await broker.aclose()
            await delete_prefix(SHARED_URL, settings.prefix)
