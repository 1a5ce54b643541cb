"""A gateway whose broker forgot it (inbox, bindings, members) restores them."""

from __future__ import annotations

import asyncio
from typing import Any

from portao.worker.app import App
from tests.gateway.conftest import StackFactory


async def test_gateway_reattaches_after_broker_forgot_it(stack_factory: StackFactory) -> None:
    pusher = App("pusher")

    @pusher.route("poke")
    async def poke(ctx: Any, data: Any) -> Any:
        await ctx.push_user(data, "poked", {"by": ctx.user})
        return [m.user for m in await ctx.room_members("lobby")]

    stack = await stack_factory(app=pusher)
    bob = await stack.authed("bob", rooms=["*"])
    assert (await bob.request({"op": "sub", "room": "lobby", "id": 1}))["op"] == "ok"
    alice = await stack.authed("alice")
    gateway = stack.gateway
    # The broker forgets the gateway, as after an outage longer than presence_ttl_s.
    await stack.broker.close_inbox(gateway.id)
    await stack.broker.forget_gateway(gateway.id)
    assert await stack.broker.room_members("lobby") == []
    # The gateway notices on its next inbox read and restores everything.
    for _ in range(300):
        if [m.user for m in await stack.broker.room_members("lobby")] == ["bob"]:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("room membership was not restored")
    answer = await alice.request({"op": "call", "id": 2, "route": "poke", "data": "bob"})
    assert answer == {"op": "reply", "id": 2, "data": ["bob"]}
    push, _ = await bob.recv_until(lambda m: m["op"] == "push")
    assert push == {"op": "push", "route": "poked", "data": {"by": "alice"}}
