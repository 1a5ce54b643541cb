"""Publish failures are logged, one line per cause per interval, with their count."""

from __future__ import annotations

import asyncio
import logging

import pytest

from portao.gateway import server
from tests.gateway.conftest import StackFactory, eventually


async def test_publish_failures_are_logged_rate_limited(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "REPEAT_LOG_INTERVAL_S", 0.4)
    caplog.set_level(logging.WARNING, logger="portao.gateway")
    stack = await stack_factory(max_queue_length=1)
    await stack.broker.register_routes(["nobody.reads"])  # no worker: the queue fills
    client = await stack.authed()
    token = stack.token("alice")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "publish failed" in r.getMessage()]

    send = {"op": "send", "route": "nobody.reads", "data": {"secret-body": token}}
    assert await client.request({**send, "id": 0}) == {"op": "ack", "id": 0}
    for i in range(1, 21):
        await client.send({**send, "id": i})
    for i in range(1, 21):
        answer = await client.recv()
        assert (answer["id"], answer["code"]) == (i, "overloaded")
    await client.send({"op": "send", "route": "no.such.route", "data": None, "id": 99})
    assert (await client.recv())["code"] == "unknown_route"
    assert lines() == [
        "publish failed (overloaded) 1 time since the last report; "
        "last: route 'nobody.reads' holds 1 messages",
        "publish failed (unknown_route) 1 time since the last report; "
        "last: no worker registered the route",  # a client's route name is its input
    ]
    # The other 19 are told in one line once the cause's quiet time is over.
    await eventually(lambda: len(lines()) == 3, timeout_s=2.0)
    assert lines()[2].startswith("publish failed (overloaded) 19 times since the last report")
    await asyncio.sleep(0.5)
    assert len(lines()) == 3  # nothing more to tell
    assert stack.gateway.stats.publish_failures == 21
    assert all("secret-body" not in line and token not in line for line in lines())
