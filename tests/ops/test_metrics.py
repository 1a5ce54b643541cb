"""`/metrics`, `/healthz`, `/readyz` and the chat page over a real stack and real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.aiohttp import make_aiohttp_handler

from portao.admin.metrics import build_registry
from portao.admin.server import AdminServer, build_admin_app
from tests.gateway.conftest import Stack, StackFactory, eventually
from tests.ops.admin import get, scrape


async def serve_admin(stack: Stack, static_dir: Path | None = None) -> AdminServer:
    registry = build_registry(gateway=stack.gateway, worker=stack.worker, brokers=[stack.broker])

    async def ready() -> bool:
        return stack.gateway.is_ready()

    extra = {} if static_dir is None else {"static_dir": static_dir}
    app = build_admin_app(metrics=make_aiohttp_handler(registry), ready=ready, **extra)
    server = AdminServer(app, "127.0.0.1", 0)
    await server.start()
    return server


@pytest.fixture
async def admin(stack_factory: StackFactory) -> AsyncIterator[tuple[Stack, str]]:
    stack = await stack_factory(max_attempts=2, retry_delay_s=0.01)
    server = await serve_admin(stack)
    yield stack, f"http://127.0.0.1:{server.port}"
    await server.aclose()


async def test_metrics_move_with_traffic(admin: tuple[Stack, str]) -> None:
    stack, base = admin
    before = await scrape(base)
    assert before.value("portao_gateway_connections_open") == 0
    assert before.value("portao_gateway_ready") == 1
    assert before.value("portao_broker_up") == 1
    assert before.value("process_resident_memory_bytes") > 0
    assert before.value("process_open_fds") > 0

    alice = await stack.authed("alice")
    bob = await stack.authed("bob")
    for n in range(3):
        assert (await alice.request({"op": "call", "id": n, "route": "echo", "data": n}))["op"] \
            == "reply"
    assert await alice.request({"op": "send", "id": "s", "route": "echo", "data": 1}) == {
        "op": "ack", "id": "s",
    }
    failed = await alice.request({"op": "call", "id": "f", "route": "fail", "data": None})
    assert failed["code"] == "handler_error"
    missing = await alice.request({"op": "call", "id": "u", "route": "nope", "data": None})
    assert missing["code"] == "unknown_route"
    bad = await alice.request({"op": "call", "id": "b", "route": "echo"})  # no data
    assert bad["code"] == "bad_request"
    await bob.aclose()
    await eventually(lambda: stack.gateway.stats.closed == 1)
    await eventually(lambda: stack.worker.stats.handled == 4)  # the send may finish after its ack

    m = await scrape(base)
    assert m.value("portao_gateway_connections_opened_total") == 2
    assert m.value("portao_gateway_connections_open") == 1
    assert m.value("portao_gateway_connections_closed_total", reason="client") == 1
    assert m.value("portao_gateway_messages_in_total", op="auth", route="") == 2
    assert m.value("portao_gateway_messages_in_total", op="call", route="echo") == 3
    assert m.value("portao_gateway_messages_in_total", op="call", route="fail") == 1
    assert m.value("portao_gateway_messages_in_total", op="send", route="echo") == 1
    assert m.value("portao_gateway_messages_out_total", op="reply", route="") == 3
    assert m.value("portao_gateway_messages_out_total", op="ack", route="") == 1
    assert m.value("portao_gateway_errors_total", code="handler_error") == 1
    assert m.value("portao_gateway_errors_total", code="unknown_route") == 1
    assert m.value("portao_gateway_errors_total", code="bad_request") == 1  # the session's
    assert m.value("portao_gateway_broker_publish_failures_total") == 1
    assert m.value("portao_gateway_pending_calls") == 0
    # four calls answered by a worker; five publishes accepted by the broker
    assert m.value("portao_gateway_call_latency_seconds_count") == 4
    assert 0 < m.value("portao_gateway_call_latency_seconds_sum") < 4
    assert m.value("portao_gateway_call_latency_seconds_bucket", le="+Inf") == 4
    assert m.value("portao_gateway_broker_publish_latency_seconds_count") == 5
    assert 0 <= m.value("portao_gateway_inbox_lag_seconds") < 5
    assert m.value("portao_worker_handled_total") == 4
    assert m.value("portao_worker_failed_attempts_total") == 2
    assert m.value("portao_worker_retries_total") == 1
    assert m.value("portao_worker_dead_letters_total") == 1
    assert m.value("portao_worker_handler_latency_seconds_count") == 6
    assert m.value("portao_worker_in_flight") == 0
    assert m.value("portao_gateway_outbound_buffered_bytes") == 0


async def test_health_and_readiness_through_the_drain(admin: tuple[Stack, str]) -> None:
    stack, base = admin
    assert await get(base + "/healthz") == (200, "ok\n")
    assert await get(base + "/readyz") == (200, "ready\n")
    await stack.gateway.drain()
    assert await get(base + "/readyz") == (503, "not ready\n")
    assert (await get(base + "/healthz"))[0] == 200
    m = await scrape(base)
    assert m.value("portao_gateway_ready") == 0


async def test_chat_page_and_static_files(stack_factory: StackFactory, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>chat</title>")
    (tmp_path / "chat.js").write_text("console.log('hi')")
    stack = await stack_factory()
    server = await serve_admin(stack, tmp_path)
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert await get(base + "/") == (200, "<!doctype html><title>chat</title>")
        assert await get(base + "/static/chat.js") == (200, "console.log('hi')")
        assert (await get(base + "/static/../../etc/passwd"))[0] == 404
    finally:
        await server.aclose()
    bare = await serve_admin(stack, tmp_path / "absent")
    try:
        assert (await get(f"http://127.0.0.1:{bare.port}/"))[0] == 404
    finally:
        await bare.aclose()


async def test_a_busy_admin_port_is_named(stack_factory: StackFactory) -> None:
    from portao.errors import ConfigError
    from portao.runtime import start_admin

    stack = await stack_factory()
    first = await serve_admin(stack)
    try:
        settings = stack.settings.model_copy(update={"admin": f"127.0.0.1:{first.port}"})
        registry = build_registry(gateway=stack.gateway)

        async def ready() -> bool:
            return True

        with pytest.raises(ConfigError, match="admin: cannot listen on"):
            await start_admin(settings, registry, ready)
        assert await start_admin(settings, registry, ready, required=False) is None
    finally:
        await first.aclose()


def test_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    from portao.admin.histogram import BOUNDS_S, LatencyHistogram

    hist = LatencyHistogram()
    for seconds in (0.0005, 0.0006, 0.001, 7.0, 99.0):
        hist.observe(seconds)
    buckets = dict(hist.cumulative())
    assert buckets["0.0005"] == 1  # a value on a bound counts in that bucket
    assert buckets["0.001"] == 3
    assert buckets["10.0"] == 4
    assert buckets["+Inf"] == 5
    assert len(buckets) == len(BOUNDS_S) + 1
    assert hist.sum == 0.0005 + 0.0006 + 0.001 + 7.0 + 99.0
