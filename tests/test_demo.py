"""The demo app end to end through a worker, with the test acting as the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from portao.broker.memory import MemoryBroker
from portao.config import Settings
from portao.demo import app
from portao.envelope import ErrorReply, InboxMessage, Join, Leave, Push, Reply
from portao.worker import Worker
from tests.worker.harness import HandGateway, setup


class Demo:
    """The demo app behind a hand-driven gateway; each call runs a fresh burst worker."""

    def __init__(self, broker: MemoryBroker, gw: HandGateway, settings: Settings) -> None:
        self.broker, self.gw, self.settings = broker, gw, settings
        self.worker: Worker | None = None

    async def call(self, route: str, data: Any, *, expect: int = 1, **fields: Any) -> list[Any]:
        """Run one call; the inbox messages it caused, JSON payloads decoded."""
        await self.gw.publish(route, data, **fields)
        self.worker = Worker(app, self.broker, self.broker, self.settings, fetch_timeout_s=0.05)
        await self.worker.run(burst=True)
        return [_readable(message) for message in await self.gw.read(expect)]


def _readable(message: InboxMessage) -> Any:
    match message:
        case Reply(data=data):
            return ("reply", msgspec.json.decode(data))
        case Push(route=route, room=room, data=data):
            return ("push", route, room, msgspec.json.decode(data))
        case _:
            return message


@pytest.fixture
async def demo(make_settings: Callable[..., Settings]) -> AsyncIterator[Demo]:
    async with setup(make_settings, app, max_attempts=2, retry_delay_s=0.01) as (broker, gw, w):
        yield Demo(broker, gw, w.settings)


async def test_echo(demo: Demo) -> None:
    assert await demo.call("echo", {"a": [1, None]}) == [("reply", {"a": [1, None]})]


async def test_join_say_who_leave(demo: Demo) -> None:
    await demo.broker.bind_room(demo.gw.id, "lobby")  # the gateway holds members of lobby
    assert await demo.call("chat.join", {"room": "lobby"}, expect=2, user="ana", conn=1) == [
        Join(conn=1, room="lobby", user="ana"),
        ("reply", {"room": "lobby", "joined": True}),
    ]
    await demo.call("chat.join", {"room": "lobby"}, expect=2, user="bo", conn=2)
    await demo.call("chat.join", {"room": "lobby"}, expect=2, user="ana", conn=3)

    said = await demo.call("chat.say", {"room": "lobby", "text": "hi"}, expect=2, user="bo")
    assert said == [
        ("push", "chat.message", "lobby", {"room": "lobby", "user": "bo", "text": "hi"}),
        ("reply", {"delivered": True}),
    ]

    assert await demo.call("chat.who", {"room": "lobby"}) == [("reply", ["ana", "bo"])]

    assert await demo.call("chat.leave", {"room": "lobby"}, expect=2, user="bo", conn=2) == [
        Leave(conn=2, room="lobby", user="bo"),
        ("reply", {"room": "lobby", "left": True}),
    ]
    assert await demo.call("chat.who", {"room": "lobby"}) == [("reply", ["ana"])]


async def test_fail_is_retried_then_dead_lettered(demo: Demo) -> None:
    [error] = await demo.call("fail", None)
    assert isinstance(error, ErrorReply)
    assert (error.code, error.message) == (
        "handler_error",
        "handler for route fail failed after 2 attempts",
    )
    [dead] = await demo.broker.dead_letters("fail")
    assert dead.error == "RuntimeError: the 'fail' route always fails (attempt 2)"
    assert demo.worker is not None
    assert demo.worker.stats.retries == 1


@pytest.mark.parametrize(
    ("route", "data", "error"),
    [
        ("chat.say", {"text": "no room"}, "ValueError: data must be an object with 'room'"),
        ("chat.say", {"room": "lobby"}, "ValueError: data must be an object with 'text'"),
        ("chat.join", {"room": "no spaces"}, "ValueError: room must match"),
        ("chat.who", ["lobby"], "ValueError: data must be an object with 'room'"),
    ],
)
async def test_bad_data_is_a_handler_error(demo: Demo, route: str, data: Any, error: str) -> None:
    [reply] = await demo.call(route, data)
    assert isinstance(reply, ErrorReply)
    assert reply.code == "handler_error"
    [dead] = await demo.broker.dead_letters(route)
    assert dead.error.startswith(error)
