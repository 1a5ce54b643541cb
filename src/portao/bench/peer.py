"""The peer: python-socketio with its Redis manager, served by uvicorn.

It runs the same chat/echo workload as portao's demo app over WebSocket: the
`connect` handler checks the same JWT with portao's verifier, `echo` acks its
data, `sub` joins a room the token allows, `chat.say` emits `chat.message` to the
room through the Redis manager (pub/sub, as portao's room pushes). The load
generator speaks Socket.IO to it (`portao.bench.sio`).
"""

from __future__ import annotations

import time
from typing import Any

import socketio  # type: ignore[import-untyped,import-not-found,unused-ignore]
import uvicorn

from portao.names import is_valid_name
from portao.session.auth import AuthFailure, TokenVerifier


def build(secret: str, redis_url: str | None, channel: str) -> Any:
    """The ASGI app: a Socket.IO server with the bench events."""
    manager = socketio.AsyncRedisManager(redis_url, channel=channel) if redis_url else None
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager,
                               max_http_buffer_size=65536)
    verifier = TokenVerifier("HS256", secret)

    @sio.event  # type: ignore[untyped-decorator,misc,unused-ignore]
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        claims = verifier.verify(token, time.time()) if isinstance(token, str) else None
        if claims is None or isinstance(claims, AuthFailure):
            raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        await sio.save_session(sid, {"claims": claims})

    @sio.on("echo")  # type: ignore[untyped-decorator,misc,unused-ignore]
    async def echo(sid: str, data: Any) -> Any:
        return data

    @sio.on("bench.ping")  # type: ignore[untyped-decorator,misc,unused-ignore]
    async def ping(sid: str) -> str:
        return "pong"

    @sio.on("sub")  # type: ignore[untyped-decorator,misc,unused-ignore]
    async def sub(sid: str, room: Any) -> bool:
        claims = (await sio.get_session(sid))["claims"]
        if not is_valid_name(room) or not claims.may_join(room):
            return False
        await sio.enter_room(sid, room)
        return True

    @sio.on("chat.say")  # type: ignore[untyped-decorator,misc,unused-ignore]
    async def say(sid: str, data: Any) -> Any:
        claims = (await sio.get_session(sid))["claims"]
        room = data["room"]
        await sio.emit("chat.message", {"room": room, "user": claims.sub, "text": data["text"]},
                       room=room)
        return {"delivered": True}

    return socketio.ASGIApp(sio)


def main(host: str, port: int, secret: str, redis_url: str | None, channel: str) -> None:
    """Serve on uvicorn (uvloop, websockets) until SIGINT/SIGTERM."""
    uvicorn.run(build(secret, redis_url, channel), host=host, port=port, loop="uvloop",
                ws="websockets-sansio", lifespan="off", log_level="warning",
                backlog=4096, ws_per_message_deflate=False)
