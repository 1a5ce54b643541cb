"""`portao gateway --processes 2` on Redis: real processes, real signals, one shared port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portao.client import connect
from portao.errors import RequestError
from portao.session.auth import mint_token
from tests.conftest import REDIS_HOST, REDIS_PORT, require_service
from tests.gateway.conftest import RawClient
from tests.ops.admin import get, scrape, status_is, until
from tests.procs import SECRET, Procs, processes, wait_exit

APP = "tests.apps.scale:app"
BROKER = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def free_port_block(size: int) -> int:
    """A port P with P … P+size-1 all free right now (the admin ports of N processes)."""
    for _ in range(100):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            base: int = first.getsockname()[1]
            try:
                for offset in range(1, size):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", base + offset))
            except OSError:
                continue
            return base
    raise RuntimeError("no block of free ports")


class Supervised:
    """A supervisor and a worker, started for one test."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.port = free_port_block(1)
        self.admin_port = free_port_block(3)
        self.base = f"http://127.0.0.1:{self.admin_port}"
        worker_admin = free_port_block(1)
        self.worker_base = f"http://127.0.0.1:{worker_admin}"
        procs.worker(APP, "--broker", BROKER, "--admin", f"127.0.0.1:{worker_admin}",
                     name="worker")
        self.parent = procs.spawn(
            "gateway", "--processes", "2", "--broker", BROKER,
            "--listen", f"tcp://127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}",
            name="supervisor",
        )  # fmt: skip

    async def processes(self) -> list[dict[str, Any]]:
        status, text = await get(self.base + "/processes")
        assert status == 200
        out: list[dict[str, Any]] = json.loads(text)
        return out

    async def all_ready(self) -> bool:
        try:
            listed = await self.processes()
        except OSError:
            assert self.parent.poll() is None, self.procs.logs()
            return False
        return len(listed) == 2 and all(p["ready"] for p in listed)

    async def call_echo(self, value: Any) -> Any:
        """One fresh connection, one call (retried while no worker has registered yet)."""
        token = mint_token(SECRET, "ops", now=time.time())
        async with await connect(f"tcp://127.0.0.1:{self.port}", token=token) as client:
            for _ in range(200):
                try:
                    return await client.call("echo", value, timeout_s=10)
                except RequestError as exc:
                    if exc.code != "unknown_route":
                        raise
                    await asyncio.sleep(0.05)
        raise AssertionError("no worker registered the routes")


@pytest.fixture
def supervised(tmp_path: Path, prefix: str) -> Iterator[Supervised]:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    with processes(tmp_path, prefix=prefix, drain_timeout_s="10") as procs:
        yield Supervised(procs)


@pytest.mark.redis
@pytest.mark.slow
async def test_a_killed_process_is_restarted_and_the_port_keeps_serving(
    supervised: Supervised,
) -> None:
    await until(supervised.all_ready, 30)
    assert await supervised.call_echo("warm") == "warm"
    before = await supervised.processes()
    victim = before[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    async def reaped() -> bool:
        now = (await supervised.processes())[0]
        return now["pid"] != victim or not now["ready"]

    # Connections already queued on the victim's socket die with it (documented);
    # once it is gone, the survivor takes every new connection.
    await until(reaped, 10)
    for n in range(10):
        assert await supervised.call_echo(n) == n

    async def restarted() -> bool:
        now = (await supervised.processes())[0]
        return now["pid"] != victim and now["ready"] and now["restarts"] == 1

    await until(restarted, 30)
    for n in range(20):
        assert await supervised.call_echo(n) == n
    metrics = await scrape(supervised.base)
    assert metrics.value("portao_supervisor_restarts_total", process="0") == 1
    assert metrics.value("portao_supervisor_processes_ready") == 2
    assert metrics.value("process_resident_memory_bytes", process="supervisor") > 0
    # Both processes took connections on the one port (20 tries: 2^-19 to miss one).
    for process in ("0", "1"):
        assert metrics.value("portao_gateway_connections_opened_total", process=process) > 0
    assert supervised.parent.poll() is None
    # The worker's own admin listener counts what it served.
    assert await status_is(supervised.worker_base + "/readyz", 200)
    worker = await scrape(supervised.worker_base)
    assert worker.value("portao_worker_handled_total") >= 31
    assert worker.value("portao_worker_handler_latency_seconds_count") >= 31
    assert worker.value("portao_broker_up") == 1


@pytest.mark.redis
@pytest.mark.slow
async def test_sigterm_drains_every_process_with_calls_in_flight_answered(
    supervised: Supervised,
) -> None:
    await until(supervised.all_ready, 30)
    assert await supervised.call_echo("warm") == "warm"
    pids = [p["pid"] for p in await supervised.processes()]
    clients = []
    for n in range(8):
        reader, writer = await asyncio.open_connection("127.0.0.1", supervised.port)
        client = RawClient(reader, writer, "tcp")
        clients.append(client)
        token = mint_token(SECRET, f"u{n}", now=time.time())
        assert (await client.request({"op": "auth", "token": token}))["op"] == "ok"
        await client.send({"op": "call", "id": n, "route": "work", "data": {"sleep": 2, "n": n}})

    async def all_accepted() -> bool:
        m = await scrape(supervised.base)
        return m.total("portao_gateway_messages_in_total", op="call", route="work") == 8

    await until(all_accepted, 10)
    supervised.parent.send_signal(signal.SIGTERM)
    for n, client in enumerate(clients):
        reply, before = await client.recv_until(lambda m: m["op"] == "reply", timeout_s=10)
        assert reply == {"op": "reply", "id": n, "data": {"sleep": 2, "n": n}}
        assert [m["code"] for m in before if m["op"] == "bye"] == ["shutdown"]
        assert await client.closed()
        await client.aclose()
    assert await wait_exit(supervised.parent, 20) == 0, supervised.procs.logs()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_process_failing_before_any_served_stops_the_supervisor(tmp_path: Path) -> None:
    # A socket without SO_REUSEPORT holds the port: every process fails to listen.
    # (A broker down at start no longer fails a gateway: it starts not ready.)
    with socket.socket() as holder, processes(tmp_path) as procs:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        parent = procs.spawn(
            "gateway", "--processes", "2", "--broker", "redis://127.0.0.1:1/0",
            "--listen", f"tcp://127.0.0.1:{port}", name="supervisor",
        )  # fmt: skip
        assert await wait_exit(parent, 60) == 1
        logs = procs.logs()
        assert "before it served; giving up" in logs
        assert "address already in use" in logs


def test_processes_need_fixed_ports(tmp_path: Path) -> None:
    with processes(tmp_path) as procs:
        parent = procs.spawn(
            "gateway", "--processes", "2", "--broker", "redis://127.0.0.1:1/0",
            "--listen", "tcp://127.0.0.1:0", name="supervisor",
        )  # fmt: skip
        assert parent.wait(timeout=60) == 2
        assert "--processes needs fixed ports" in procs.logs()
