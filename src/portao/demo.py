"""The demo app, and the first example of how to write a portao app.

Each handler gets `ctx` (who asked, and how to reach connections and rooms) and the
client's decoded `data`; what it returns is the reply to a `call`. A handler that
raises is retried, then dead-lettered, and the caller gets `handler_error`.

Try it: `portao run`, then `nc 127.0.0.1 7878` and type, one line each,
`{"op": "auth", "token": "<the printed token>"}`,
`{"op": "call", "id": 1, "route": "chat.join", "data": {"room": "lobby"}}`,
`{"op": "call", "id": 2, "route": "chat.say", "data": {"room": "lobby", "text": "hi"}}`.
"""

from __future__ import annotations

from typing import Any

from portao.names import is_valid_name
from portao.worker import App, Context

app = App("demo")


def _field(data: Any, key: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"data must be an object with {key!r}")
    return data[key]


def _room(data: Any) -> str:
    room = _field(data, "room")
    if not isinstance(room, str) or not is_valid_name(room):
        raise ValueError("room must match [A-Za-z0-9_.:-]{1,128}")
    return room


@app.route("echo")
async def echo(ctx: Context, data: Any) -> Any:
    """Reply with what was sent."""
    return data


@app.route("chat.say")
async def say(ctx: Context, data: Any) -> Any:
    """Send `text` to everyone in `room` (the sender too, if a member)."""
    room, text = _room(data), _field(data, "text")
    await ctx.publish_room(room, "chat.message", {"room": room, "user": ctx.user, "text": text})
    return {"delivered": True}


@app.route("chat.join")
async def join(ctx: Context, data: Any) -> Any:
    """Put the caller's connection in `room`; pushes to it start before this reply."""
    room = _room(data)
    await ctx.join(room)
    return {"room": room, "joined": True}


@app.route("chat.leave")
async def leave(ctx: Context, data: Any) -> Any:
    """Take the caller's connection out of `room`."""
    room = _room(data)
    await ctx.leave(room)
    return {"room": room, "left": True}


@app.route("chat.who")
async def who(ctx: Context, data: Any) -> Any:
    """The distinct users in `room`, sorted."""
    members = await ctx.room_members(_room(data))
    return sorted({member.user for member in members})


@app.route("fail")
async def fail(ctx: Context, data: Any) -> Any:
    """Always raises, to watch retries and the dead-letter queue at work."""
    raise RuntimeError(f"the 'fail' route always fails (attempt {ctx.attempt})")
