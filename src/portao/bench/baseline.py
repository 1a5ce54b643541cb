"""The "before" server: one thread per client, handlers run on the socket thread.

The standard library's `ThreadingTCPServer`, speaking wire protocol v1 with
portao's own codec, message decoder, token verifier and the demo app's handlers,
so the same scenarios run against it unchanged. What differs is only the
concurrency model: a blocking thread (and its stack) per connection, and a room
broadcast written to every member's socket by the sender's thread.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import socketserver
import threading
import time
import typing
from collections.abc import Awaitable, Coroutine
from types import FrameType
from typing import Any

import msgspec

from portao.broker.base import Broker, Member, StateStore
from portao.envelope import Envelope, InboxMessage, Push, new_message_id
from portao.errors import ErrorCode
from portao.gateway.listeners import set_keepalive
from portao.session.auth import AuthFailure, Claims, TokenVerifier
from portao.wire import messages as wire
from portao.wire.events import Auth, BadMessage, Call, FrameError, Ping, Send, Sub, Unsub
from portao.wire.framing import NewlineCodec
from portao.worker.app import App
from portao.worker.context import Context, encode_json

GATEWAY_ID = "baseline"
READ_BYTES = 65536
MAX_FRAME_BYTES = 65536


class _Client:
    """One connected socket; the lock keeps replies and pushes from interleaving."""

    def __init__(self, sock: socket.socket, conn_id: int) -> None:
        self.sock = sock
        self.conn_id = conn_id
        self.codec = NewlineCodec(MAX_FRAME_BYTES)
        self.lock = threading.Lock()
        self.claims: Claims | None = None
        self.rooms: set[str] = set()

    def send(self, payload: bytes) -> None:
        # A closed socket is seen and cleaned up by the reading thread.
        with self.lock, contextlib.suppress(OSError):
            self.sock.sendall(self.codec.send_frame(payload))


class _Rooms:
    """What the demo handlers need of a broker and a state store, done in place.

    Its coroutines never suspend, so a handler runs to completion on the calling
    thread; a room push is written to each member's socket right there.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: dict[int, _Client] = {}
        self.members: dict[str, dict[int, str]] = {}

    async def publish_room(self, room: str, message: InboxMessage) -> None:
        assert isinstance(message, Push)
        payload = wire.encode_push(message.route, message.data, room)
        with self.lock:
            targets = [self.clients.get(conn) for conn in self.members.get(room, {})]
        for client in targets:
            if client is not None:
                client.send(payload)

    async def send_to_gateway(self, gateway_id: str, message: InboxMessage) -> None:
        if isinstance(message, Push) and message.conn is not None:
            client = self.clients.get(message.conn)
            if client is not None:
                client.send(wire.encode_push(message.route, message.data))

    async def room_join(self, room: str, member: Member) -> None:
        with self.lock:
            self.members.setdefault(room, {})[member.conn] = member.user

    async def room_leave(self, room: str, member: Member) -> None:
        self.leave(room, member.conn)

    async def room_members(self, room: str) -> list[Member]:
        with self.lock:
            members = dict(self.members.get(room, {}))
        return sorted(Member(GATEWAY_ID, conn, user) for conn, user in members.items())

    def leave(self, room: str, conn_id: int) -> None:
        with self.lock:
            members = self.members.get(room)
            if members is not None:
                members.pop(conn_id, None)
                if not members:
                    del self.members[room]


def run_to_end(awaitable: Awaitable[Any]) -> Any:
    """Run a coroutine that never suspends, on this thread."""
    coro = typing.cast(Coroutine[Any, Any, Any], awaitable)
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("the handler waited on something the baseline cannot provide")


class BaselineServer(socketserver.ThreadingTCPServer):
    """Thread-per-client server for wire protocol v1 (newline framing)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096

    def __init__(self, address: tuple[str, int], verifier: TokenVerifier, app: App) -> None:
        self.verifier = verifier
        self.app = app
        self.rooms = _Rooms()
        self._ids = iter(range(1, 1 << 62))
        super().__init__(address, _Handler)

    def handle(self, sock: socket.socket) -> None:
        """Serve one connection until it closes (runs on its own thread)."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_keepalive(sock)
        client = _Client(sock, next(self._ids))
        with self.rooms.lock:
            self.rooms.clients[client.conn_id] = client
        codec = client.codec
        try:
            while data := sock.recv(READ_BYTES):
                codec.receive_data(data)
                for event in codec.events_received():
                    if isinstance(event, FrameError):
                        client.send(wire.encode_error(event.code, event.message))
                        if event.fatal:
                            return
                    else:
                        self._handle(client, wire.decode_message(event.payload))
        except OSError:
            pass
        finally:
            for room in client.rooms:
                self.rooms.leave(room, client.conn_id)
            with self.rooms.lock:
                self.rooms.clients.pop(client.conn_id, None)

    def _handle(self, client: _Client, message: Any) -> None:
        match message:
            case BadMessage(code=code, message=text, id=id):
                client.send(wire.encode_error(code, text, id))
            case Ping(id=id):
                client.send(wire.encode_pong(id))
            case Auth(token=token, id=id):
                claims = self.verifier.verify(token, time.time())
                if isinstance(claims, AuthFailure):
                    client.send(wire.encode_error(ErrorCode.UNAUTHORIZED, claims.message, id))
                else:
                    client.claims = claims
                    client.send(wire.encode_ok(claims.sub, id))
            case _ if client.claims is None:
                client.send(wire.encode_error(ErrorCode.UNAUTHORIZED, "auth first",
                                              getattr(message, "id", None)))
            case Call(id=id, route=route, data=data):
                outcome = self._run(client, route, data)
                client.send(wire.encode_reply(id, outcome) if isinstance(outcome, bytes)
                            else wire.encode_error(*outcome, id))
            case Send(route=route, data=data, id=id):
                outcome = self._run(client, route, data)
                if id is not None:
                    client.send(wire.encode_ack(id) if isinstance(outcome, bytes)
                                else wire.encode_error(*outcome, id))
            case Sub(room=room, id=id) | Unsub(room=room, id=id):
                self._sub(client, room, id, isinstance(message, Sub))

    def _run(self, client: _Client, route: str, data: bytes) -> bytes | tuple[ErrorCode, str]:
        """The handler's result as JSON, or the error code and message."""
        handler = self.app.routes.get(route)
        if handler is None:
            return ErrorCode.UNKNOWN_ROUTE, "no handler for this route"
        assert client.claims is not None
        envelope = Envelope(new_message_id(), "call", route, client.claims.sub, GATEWAY_ID,
                            client.conn_id, None, data)
        rooms = typing.cast(Broker, self.rooms)
        ctx = Context(envelope, 1, rooms, typing.cast(StateStore, rooms))
        try:
            return encode_json(run_to_end(handler(ctx, msgspec.json.decode(data))))
        except Exception as exc:
            return ErrorCode.HANDLER_ERROR, str(exc)[:200]

    def _sub(self, client: _Client, room: str, id: Any, joining: bool) -> None:
        assert client.claims is not None
        if joining and not client.claims.may_join(room):
            client.send(wire.encode_error(ErrorCode.FORBIDDEN, "room not in token", id))
            return
        member = Member(GATEWAY_ID, client.conn_id, client.claims.sub)
        if joining:
            run_to_end(self.rooms.room_join(room, member))
            client.rooms.add(room)
        else:
            self.rooms.leave(room, client.conn_id)
            client.rooms.discard(room)
        client.send(wire.encode_ok(client.claims.sub, id))


class _Handler(socketserver.BaseRequestHandler):
    server: BaselineServer

    def handle(self) -> None:
        self.server.handle(self.request)


def main(host: str, port: int, verifier: TokenVerifier, app: App) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = BaselineServer((host, port), verifier, app)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with server:
        server.serve_forever(poll_interval=0.2)
