"""Each scenario for about a second at 20 connections: the JSON has its fields.

Smoke tests, not measurements: the load generator runs in a thread (its own
processes do the work) while this test's event loop serves the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hdrh", reason="needs the bench extra: pip install -e '.[bench]'")
pytest.importorskip("psutil", reason="needs the bench extra: pip install -e '.[bench]'")

from portao.bench import loadgen, report
from portao.bench.bare import BareEcho
from portao.bench.baseline import BaselineServer
from portao.demo import app as demo_app
from portao.session.auth import TokenVerifier

from .conftest import SECRET, Stack, StackFactory

COMMON = {"connections": 20, "processes": 2, "duration_s": 1.0, "warmup_s": 0.2,
          "secret": SECRET, "timeout_s": 5.0}
FIELDS = {"scenario", "target", "connections", "connected", "processes", "connect_s",
          "done", "per_s", "errors", "unanswered", "latency_ms", "server", "machine"}


async def run(target: str, scenario: str, **overrides: Any) -> dict[str, Any]:
    options = loadgen.Options(scenario=scenario, target=target, **(COMMON | overrides))
    lines: list[str] = []
    result = await asyncio.to_thread(loadgen.run, options, lines.append)
    assert result.keys() >= FIELDS
    assert lines, "progress was shown"
    json.loads(json.dumps(result))  # plain JSON all the way down
    return result


def url(stack: Stack) -> str:
    host, port = stack.address(0)
    return f"tcp://{host}:{port}"


async def test_rpc_closed_loop(stack: Stack, tmp_path: Path) -> None:
    result = await run(url(stack), "rpc", server_pid=os.getpid())
    assert result["connected"] == 20
    assert result["done"] > 0
    assert result["errors"] == {}
    assert result["mode"] == "closed"
    assert result["latency_ms"]["p99"] >= result["latency_ms"]["p50"] > 0
    assert result["server"]["connected"]["fds"] > 20
    report.write_json(result, tmp_path / "rpc.json")
    assert json.loads((tmp_path / "rpc.json").read_text())["scenario"] == "rpc"
    assert "calls/s" in report.describe(result)


async def test_rpc_open_loop_offers_the_rate(stack: Stack) -> None:
    result = await run(url(stack), "rpc", rate=200.0)
    assert result["mode"] == "open"
    assert result["offered_per_s"] == 200.0
    assert 100 <= result["done"] <= 260  # about one second at 200/s, all answered
    assert result["unanswered"] == 0


async def test_idle_pings_every_connection(stack: Stack) -> None:
    result = await run(url(stack), "idle", server_pid=os.getpid())
    assert result["done"] == result["connected"] == 20
    assert "bytes_per_connection" in result["server"]
    assert "pings answered" in report.describe(result)


async def test_fanout_delivers_to_every_member(stack: Stack) -> None:
    result = await run(url(stack), "fanout", rate=20.0)
    assert result["messages"] > 0
    # Members count the messages stamped inside the window: at most all of them each.
    assert 20 <= result["deliveries"] <= 20 * result["messages"]
    assert result["errors"] == {}


async def test_churn_counts_cycles(stack: Stack) -> None:
    result = await run(url(stack), "churn", connections=4, processes=1)
    assert result["done"] > 0
    assert result["per_s"] > 0
    assert result["connect_errors"] == {}


async def test_bad_token_is_a_connect_error(stack: Stack) -> None:
    result = await run(url(stack), "idle", secret="another-secret-" + "y" * 32)
    assert result["connected"] == 0
    assert result["connect_errors"] == {"error unauthorized": 20}


@pytest.fixture
def baseline_url() -> Iterator[str]:
    server = BaselineServer(("127.0.0.1", 0), TokenVerifier("HS256", SECRET), demo_app)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    host, port = server.server_address[:2]
    yield f"tcp://{host}:{port}"
    server.shutdown()
    server.server_close()
    thread.join()


async def test_baseline_speaks_the_protocol(baseline_url: str) -> None:
    rpc = await run(baseline_url, "rpc")
    assert rpc["done"] > 0
    assert rpc["errors"] == {}
    fanout = await run(baseline_url, "fanout", rate=20.0)
    assert 20 <= fanout["deliveries"] <= 20 * fanout["messages"]


async def test_bare_echo_answers_calls() -> None:
    server = await asyncio.get_running_loop().create_server(BareEcho, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await run(f"tcp://127.0.0.1:{port}", "rpc")
    assert result["done"] > 0
    assert result["errors"] == {}


async def test_rpc_and_fanout_over_websocket(stack_factory: StackFactory) -> None:
    stack = await stack_factory(listen=["ws://127.0.0.1:0/"])
    host, port = stack.address(0)
    rpc = await run(f"ws://{host}:{port}/", "rpc", rate=200.0)
    assert rpc["done"] >= 100
    assert rpc["errors"] == {}
    fanout = await run(f"ws://{host}:{port}/", "fanout", rate=20.0)
    assert 20 <= fanout["deliveries"] <= 20 * fanout["messages"]
