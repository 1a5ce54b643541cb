"""Context operations against the real MemoryBroker, read back from a gateway inbox."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from portao.broker.base import Member
from portao.broker.memory import MemoryBroker
from portao.config import Settings
from portao.envelope import Join, Leave, Push
from portao.worker import ConnAddr, Context
from tests.worker.harness import FAST, HandGateway, memory_broker


@pytest.fixture
async def broker(make_settings: Callable[..., Settings]) -> AsyncIterator[MemoryBroker]:
    async with memory_broker(make_settings(**FAST)) as broker:
        await broker.register_routes(["chat.say", "other"])
        yield broker


@pytest.fixture
async def gw(broker: MemoryBroker) -> HandGateway:
    gateway = HandGateway(broker)
    await gateway.open()
    return gateway


def ctx_for(broker: MemoryBroker, gw: HandGateway, route: str = "chat.say", **kw: Any) -> Context:
    return Context(gw.envelope(route, **kw), 2, broker, broker)


async def test_fields_describe_the_message(broker: MemoryBroker, gw: HandGateway) -> None:
    env = gw.envelope("chat.say", user="dora", conn=9, deadline=123.5)
    ctx = Context(env, 2, broker, broker)
    assert (ctx.id, ctx.attempt, ctx.user, ctx.route) == (env.id, 2, "dora", "chat.say")
    assert ctx.conn == ConnAddr(gw.id, 9)
    assert ctx.deadline == 123.5
    assert "dora" in repr(ctx)


async def test_push_user_reaches_the_users_gateway(broker: MemoryBroker, gw: HandGateway) -> None:
    await broker.bind_user(gw.id, "carol")
    await ctx_for(broker, gw).push_user("carol", "note", {"n": 1})
    assert await gw.read(1) == [Push(route="note", data=b'{"n":1}', user="carol")]


async def test_push_conn_reaches_one_connection(broker: MemoryBroker, gw: HandGateway) -> None:
    ctx = ctx_for(broker, gw, conn=3)
    await ctx.push_conn(ctx.conn, "note", [1, 2])
    await ctx.push_conn(ConnAddr(gw.id, 8), "note", None)
    assert await gw.read(2) == [
        Push(route="note", data=b"[1,2]", conn=3),
        Push(route="note", data=b"null", conn=8),
    ]


async def test_publish_room_reaches_bound_gateways(broker: MemoryBroker, gw: HandGateway) -> None:
    await broker.bind_room(gw.id, "lobby")
    await ctx_for(broker, gw).publish_room("lobby", "chat.message", {"text": "hi"})
    assert await gw.read(1) == [Push(route="chat.message", data=b'{"text":"hi"}', room="lobby")]


async def test_join_and_leave_the_callers_connection(broker: MemoryBroker, gw: HandGateway) -> None:
    ctx = ctx_for(broker, gw, user="eve", conn=5)
    await ctx.join("lobby")
    assert await ctx.room_members("lobby") == [Member(gw.id, 5, "eve")]
    await ctx.leave("lobby")
    assert await ctx.room_members("lobby") == []
    assert await gw.read(2) == [
        Join(conn=5, room="lobby", user="eve"),
        Leave(conn=5, room="lobby", user="eve"),
    ]


async def test_join_another_connection_needs_its_user(
    broker: MemoryBroker, gw: HandGateway
) -> None:
    ctx = ctx_for(broker, gw, user="eve", conn=5)
    other = ConnAddr(gw.id, 6)
    with pytest.raises(ValueError, match="needs its user"):
        await ctx.join("lobby", other)
    await ctx.join("lobby", other, user="frank")
    await ctx.join("lobby", ctx.conn)
    assert await ctx.room_members("lobby") == [Member(gw.id, 5, "eve"), Member(gw.id, 6, "frank")]
    assert await gw.read(2) == [
        Join(conn=6, room="lobby", user="frank"),
        Join(conn=5, room="lobby", user="eve"),
    ]


async def test_once_is_taken_once_per_route(broker: MemoryBroker, gw: HandGateway) -> None:
    say, other = ctx_for(broker, gw), ctx_for(broker, gw, route="other")
    assert await say.once("charge-42") is True
    assert await say.once("charge-42") is False
    assert await other.once("charge-42") is True
    with pytest.raises(ValueError, match="once key"):
        await say.once("")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.publish_room("bad room", "r", 1), "room name 'bad room'"),
        (lambda c: c.publish_room("lobby", "", 1), "route name ''"),
        (lambda c: c.push_user("a/b", "r", 1), "user name 'a/b'"),
        (lambda c: c.join("x" * 129), "room name"),
        (lambda c: c.room_members("lobby!"), "room name 'lobby!'"),
    ],
)
async def test_bad_names_are_refused(
    broker: MemoryBroker, gw: HandGateway, call: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await call(ctx_for(broker, gw))


async def test_data_must_be_json(broker: MemoryBroker, gw: HandGateway) -> None:
    with pytest.raises(TypeError, match="not JSON-encodable"):
        await ctx_for(broker, gw).publish_room("lobby", "r", {"x": object()})
