"""A client that shuts its write side (`nc -q1`, shutdown(SHUT_WR)) still gets its answers.

EOF stops the reading, not the connection: what is in flight is answered (a reply, an
`ok`, or an error at the call's deadline), then the gateway closes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from portao.worker.app import App
from tests.gateway.conftest import RawClient, Stack, StackFactory

FRAMINGS = pytest.mark.parametrize("index", [0, 1], ids=["tcp", "tcp+len"])


async def _send_all_then_shut(client: RawClient, messages: list[dict[str, Any]]) -> None:
    for message in messages:
        await client.send(message)
    client.writer.write_eof()  # shutdown(SHUT_WR): the gateway reads EOF


async def _read_to_eof(client: RawClient, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    answers = []
    while True:
        try:
            answers.append(await client.recv(timeout_s))
        except (EOFError, asyncio.IncompleteReadError):
            return answers


def _slow_app() -> App:
    app = App("slow")

    @app.route("nap")
    async def nap(ctx: Any, data: Any) -> Any:
        await asyncio.sleep(data)
        return data

    return app


@FRAMINGS
async def test_calls_in_flight_are_answered_after_eof(
    stack_factory: StackFactory, index: int
) -> None:
    stack = await stack_factory(app=_slow_app(), call_timeout_s=0.6)
    await stack.broker.register_routes(["nobody.serves"])
    client = await stack.raw(index)
    await _send_all_then_shut(
        client,
        [
            {"op": "auth", "token": stack.token("alice", rooms=["r"]), "id": "a"},
            {"op": "call", "id": 1, "route": "nap", "data": 0.3},
            {"op": "call", "id": 2, "route": "nobody.serves", "data": None},
            {"op": "sub", "room": "r", "id": "s"},
            {"op": "ping", "id": "p"},
        ],
    )
    answers = await _read_to_eof(client)
    by_id = {a.get("id"): a for a in answers}
    assert by_id == {
        "a": {"op": "ok", "user": "alice", "id": "a"},
        "p": {"op": "pong", "id": "p"},
        "s": {"op": "ok", "user": "alice", "id": "s"},
        1: {"op": "reply", "id": 1, "data": 0.3},
        2: {"op": "error", "code": "timeout", "id": 2,
            "message": "no answer before the call's deadline"},
    }
    assert len(answers) == 5
    assert answers[-1] == by_id[2]  # closed only after the last answer (the deadline)
    assert stack.gateway.stats.close_reasons == {"client": 1}


@FRAMINGS
async def test_eof_with_nothing_in_flight_closes_at_once(stack: Stack, index: int) -> None:
    client = await stack.raw(index)
    await _send_all_then_shut(client, [{"op": "ping", "id": 1}])
    assert await _read_to_eof(client, timeout_s=2.0) == [{"op": "pong", "id": 1}]


async def test_newline_pipe_like_nc(stack: Stack) -> None:
    """`printf '{auth}\\n{call}\\n' | nc -q1 HOST PORT`: one write, then EOF."""
    host, port = stack.address(0)
    reader, writer = await asyncio.open_connection(host, port)
    lines = [
        {"op": "auth", "token": stack.token("bob")},
        {"op": "call", "id": 1, "route": "echo", "data": "hi"},
    ]
    writer.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    writer.write_eof()
    async with asyncio.timeout(5):
        received = await reader.read()  # to EOF: the gateway closed after answering
    writer.close()
    assert [json.loads(line) for line in received.splitlines()] == [
        {"op": "ok", "user": "bob"},
        {"op": "reply", "id": 1, "data": "hi"},
    ]
