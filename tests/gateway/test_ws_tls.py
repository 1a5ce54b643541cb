"""WebSocket and TLS listeners over real loopback sockets: ws://, wss://, tls://, tls+len://.

The WebSocket peer is websockets' own asyncio client (or its sans-I/O protocol on
a raw socket, for a peer that never answers); TLS peers trust a throwaway CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection as WsConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.uri import parse_uri

from portao.client import connect as portao_connect
from portao.gateway.connection import ClientConnection
from portao.gateway.listeners import open_server, parse_listen
from tests.certs import TlsFiles, make_tls_files
from tests.gateway.conftest import RawClient, Stack, StackFactory, eventually

_QUIET = logging.getLogger("tests.ws.client")
_QUIET.setLevel(logging.WARNING)  # the client's DEBUG lines would show URL tokens


class WsClient:
    """RawClient's methods over a WebSocket: one JSON object per text message."""

    def __init__(self, ws: WsConnection) -> None:
        self.ws = ws

    async def send(self, obj: Any) -> None:
        await self.ws.send(json.dumps(obj))

    async def send_bytes(self, payload: bytes) -> None:
        await self.ws.send(payload, text=True)  # as they are, valid UTF-8 or not

    async def recv(self, timeout_s: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            try:
                message = await self.ws.recv()
            except ConnectionClosed:
                raise EOFError("connection closed") from None
        result: dict[str, Any] = json.loads(message)
        return result

    async def request(self, obj: Any, timeout_s: float = 5.0) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv(timeout_s)

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while not predicate(message := await self.recv()):
                pass
        return message

    async def close_code(self, timeout_s: float = 5.0) -> int | None:
        """The close code the gateway sent, once the connection is closed."""
        async with asyncio.timeout(timeout_s):
            await self.ws.wait_closed()
        return self.ws.close_code


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path)


async def listen(stack: Stack, url: str, **ws_options: Any) -> str:
    """Open one more listener on the running gateway; its URL with the bound port.

    Built from the stack's settings (TLS files), as the gateway builds its own.
    """
    spec = parse_listen(url, stack.settings)
    if ws_options:
        assert spec.websocket is not None
        spec = dataclasses.replace(
            spec, websocket=dataclasses.replace(spec.websocket, **ws_options)
        )
    gateway = stack.gateway
    server = await open_server(spec, lambda: ClientConnection(gateway, spec.codec_factory()))
    gateway.servers.append(server)
    gateway.specs.append(spec)
    port = server.sockets[0].getsockname()[1]
    return url.replace(":0", f":{port}", 1)


@pytest.fixture
async def opened() -> AsyncIterator[list[WsClient]]:
    clients: list[WsClient] = []
    yield clients
    for client in clients:
        await client.ws.close()


async def ws_client(
    opened: list[WsClient], url: str, ssl_context: ssl.SSLContext | None = None, **kw: Any
) -> WsClient:
    connection = await ws_connect(
        url, ssl=ssl_context, compression=None, proxy=None, ping_interval=None,
        max_size=None, logger=_QUIET, **kw,
    )
    client = WsClient(connection)
    opened.append(client)
    return client


# -- WebSocket ----------------------------------------------------------------------


async def test_ws_every_op(stack: Stack, opened: list[WsClient]) -> None:
    url = await listen(stack, "ws://127.0.0.1:0/chat")
    c = await ws_client(opened, url)
    assert await c.request({"op": "ping", "id": "p"}) == {"op": "pong", "id": "p"}
    assert (await c.request({"op": "call", "id": 1, "route": "echo", "data": 1}))["code"] == (
        "unauthorized"
    )
    ok = await c.request({"op": "auth", "token": stack.token("alice", rooms=["chat.*"]), "id": 2})
    assert ok == {"op": "ok", "user": "alice", "id": 2}
    reply = await c.request({"op": "call", "id": 3, "route": "echo", "data": {"a": [1, "é"]}})
    assert reply == {"op": "reply", "id": 3, "data": {"a": [1, "é"]}}
    assert await c.request({"op": "send", "id": 4, "route": "echo", "data": 1}) == {
        "op": "ack", "id": 4,
    }
    assert (await c.request({"op": "sub", "room": "chat.x", "id": 5}))["op"] == "ok"
    await c.send({"op": "call", "id": 6, "route": "chat.say",
                  "data": {"room": "chat.x", "text": "hi"}})
    push = await c.recv_until(lambda m: m["op"] == "push")
    assert push["data"] == {"room": "chat.x", "user": "alice", "text": "hi"}
    assert await c.recv() == {"op": "reply", "id": 6, "data": {"delivered": True}}
    assert (await c.request({"op": "unsub", "room": "chat.x", "id": 7}))["op"] == "ok"


async def test_ws_bad_messages_keep_the_connection(stack: Stack, opened: list[WsClient]) -> None:
    c = await ws_client(opened, await listen(stack, "ws://127.0.0.1:0"))
    await c.send_bytes(b"not json")
    assert (await c.recv())["code"] == "bad_frame"
    assert (await c.request([1]))["code"] == "bad_frame"
    assert (await c.request({"op": "nope", "id": 1}))["code"] == "bad_request"
    assert await c.request({"op": "ping"}) == {"op": "pong"}


async def test_ws_split_frames_and_batches(stack: Stack, opened: list[WsClient]) -> None:
    c = await ws_client(opened, await listen(stack, "ws://127.0.0.1:0"))
    await c.ws.send([b'{"op":"pi', b'ng","id":1}'], text=True)  # one message, two frames
    assert await c.recv() == {"op": "pong", "id": 1}
    for i in range(50):
        await c.send({"op": "ping", "id": i})
    assert [(await c.recv())["id"] for _ in range(50)] == list(range(50))


async def test_url_token_ok_at_once(stack: Stack, opened: list[WsClient]) -> None:
    url = await listen(stack, "ws://127.0.0.1:0/ws")
    c = await ws_client(opened, f"{url}?token={stack.token('alice')}")
    assert await c.recv() == {"op": "ok", "user": "alice"}
    assert (await c.request({"op": "call", "id": 1, "route": "echo", "data": 2}))["data"] == 2


async def test_url_token_pipelined_call_runs_after_auth(
    stack: Stack, opened: list[WsClient]
) -> None:
    url = await listen(stack, "ws://127.0.0.1:0/ws")
    c = await ws_client(opened, f"{url}?token={stack.token('alice')}")
    await c.send({"op": "call", "id": 1, "route": "echo", "data": 2})
    assert await c.recv() == {"op": "ok", "user": "alice"}
    assert await c.recv() == {"op": "reply", "id": 1, "data": 2}


async def test_bad_url_token_is_bye_and_1008(
    stack: Stack, opened: list[WsClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = await listen(stack, "ws://127.0.0.1:0/ws")
    forged = stack.token("alice")[:-4] + "AAAA"
    c = await ws_client(opened, f"{url}?token={forged}")
    bye = await c.recv()
    assert bye["op"] == "bye"
    assert bye["code"] == "unauthorized"
    assert await c.close_code() == 1008
    assert c.ws.close_reason == "unauthorized"
    assert forged not in caplog.text
    assert forged[:20] not in caplog.text


async def test_other_path_is_refused_with_404(stack: Stack, opened: list[WsClient]) -> None:
    url = await listen(stack, "ws://127.0.0.1:0/ws")
    with pytest.raises(InvalidStatus) as refused:
        await ws_client(opened, url.replace("/ws", "/other"))
    assert refused.value.response.status_code == 404
    await eventually(lambda: not stack.gateway.conns)


@pytest.mark.parametrize(
    ("send", "code", "close_code"),
    [
        (lambda ws: ws.send(b"\x00\x01"), "bad_frame", 1003),
        (lambda ws: ws.send(b'{"op":"ping","id":"\xff"}', text=True), "bad_frame", 1007),
        (lambda ws: ws.send("x" * 2000), "too_large", 1009),
    ],
    ids=["binary", "bad-utf8", "too-large"],
)
async def test_fatal_input_bye_then_close_code(
    stack_factory: StackFactory, opened: list[WsClient], send: Any, code: str, close_code: int
) -> None:
    stack = await stack_factory(max_frame_bytes=1024)
    c = await ws_client(opened, await listen(stack, "ws://127.0.0.1:0"))
    assert await c.request({"op": "ping"}) == {"op": "pong"}
    await send(c.ws)
    bye = await c.recv()
    assert (bye["op"], bye["code"]) == ("bye", code)
    assert await c.close_code() == close_code
    await eventually(lambda: not stack.gateway.conns)
    assert stack.gateway.stats.close_reasons == {code: 1}


async def test_client_close_is_clean(stack: Stack, opened: list[WsClient]) -> None:
    c = await ws_client(opened, await listen(stack, "ws://127.0.0.1:0"))
    assert await c.request({"op": "ping"}) == {"op": "pong"}
    await c.ws.close(1000, "done")
    assert c.ws.close_code == 1000  # the gateway echoed the close frame
    await eventually(lambda: not stack.gateway.conns)


async def test_auth_deadline_closes_handshake_and_open_socket(
    stack_factory: StackFactory, opened: list[WsClient]
) -> None:
    stack = await stack_factory(auth_timeout_s=0.3)
    url = await listen(stack, "ws://127.0.0.1:0")
    host, port = stack.gateway.addresses[-1]
    reader, writer = await asyncio.open_connection(host, port)  # never sends a handshake
    c = await ws_client(opened, url)  # handshake done, never authenticates
    bye = await c.recv()
    assert (bye["code"], bye["message"]) == ("unauthorized", "authentication timeout")
    assert await c.close_code() == 1008
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()


async def test_keepalive_pings_and_closes_a_silent_peer(
    stack: Stack, opened: list[WsClient]
) -> None:
    url = await listen(stack, "ws://127.0.0.1:0/", ping_interval_s=0.2, ping_timeout_s=0.2)
    live = await ws_client(opened, url)  # websockets answers pings by itself
    host, port = stack.gateway.addresses[-1]
    reader, writer = await asyncio.open_connection(host, port)
    silent = ClientProtocol(parse_uri(f"ws://{host}:{port}/"), logger=_QUIET)
    silent.send_request(silent.connect())
    writer.write(b"".join(silent.data_to_send()))  # then never a byte again
    started = time.monotonic()
    events: list[object] = []
    async with asyncio.timeout(5):
        while data := await reader.read(65536):  # the gateway closes TCP, not waiting
            silent.receive_data(data)
            events += silent.events_received()
    frames = [e for e in events if isinstance(e, Frame)]
    assert [f.opcode for f in frames] == [Opcode.PING, Opcode.TEXT, Opcode.CLOSE]
    assert json.loads(frames[1].data)["code"] == "idle_timeout"
    assert Close.parse(frames[2].data).code == 1000
    assert time.monotonic() - started >= 0.35
    writer.close()
    # the live client went through the same pings and is still there
    assert await live.request({"op": "ping"}) == {"op": "pong"}


async def test_a_ping_flood_that_never_reads_is_a_slow_consumer(
    stack_factory: StackFactory,
) -> None:
    """Pongs the protocol answers by itself count against the outbound cap too
    (a client flooding pings and never reading grew the gateway without bound)."""
    stack = await stack_factory(outbound_buffer_bytes=64 * 1024)
    url = await listen(stack, "ws://127.0.0.1:0/")
    host, port = stack.gateway.addresses[-1]
    client = ClientProtocol(parse_uri(url), logger=_QUIET)
    client.send_request(client.connect())
    handshake = b"".join(client.data_to_send())
    ping = Frame(Opcode.PING, b"p" * 125).serialize(mask=True, extensions=[])
    flood = ping * 2000  # the same masked frame, 262 KB
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, handshake)
        assert b" 101 " in await loop.sock_recv(sock, 4096)
        deadline = time.monotonic() + 20
        while not stack.gateway.stats.slow_consumers and time.monotonic() < deadline:
            try:
                sock.send(flood)  # never a byte read from here on
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except OSError:
                break  # closed by the gateway
            await asyncio.sleep(0)
        assert stack.gateway.stats.slow_consumers == 1
        await eventually(lambda: not stack.gateway.conns)
    finally:
        sock.close()


async def test_connection_cap_bye_overloaded_1013(
    stack_factory: StackFactory, opened: list[WsClient]
) -> None:
    stack = await stack_factory(max_connections=1)
    url = await listen(stack, "ws://127.0.0.1:0")
    first = await ws_client(opened, url)
    assert await first.request({"op": "ping"}) == {"op": "pong"}
    second = await ws_client(opened, url)
    bye = await second.recv()
    assert (bye["op"], bye["code"]) == ("bye", "overloaded")
    assert await second.close_code() == 1013


async def test_graceful_shutdown_bye_then_1001(
    stack: Stack, opened: list[WsClient]
) -> None:
    c = await ws_client(opened, await listen(stack, "ws://127.0.0.1:0"))
    assert (await c.request({"op": "auth", "token": stack.token("alice")}))["op"] == "ok"
    drain = asyncio.create_task(stack.gateway.drain())
    bye = await c.recv()
    assert (bye["code"], bye["retry_after_ms"] > 0) == ("shutdown", True)
    assert await c.close_code() == 1001
    await drain


async def test_tcp_and_websocket_users_chat(stack: Stack, opened: list[WsClient]) -> None:
    url = await listen(stack, "ws://127.0.0.1:0/ws")
    alice = await stack.authed("alice")  # newline JSON over TCP
    bob = await ws_client(opened, f"{url}?token={stack.token('bob')}")
    assert (await bob.recv())["op"] == "ok"
    for i, c in enumerate((alice, bob)):
        answer = await c.request(
            {"op": "call", "id": i, "route": "chat.join", "data": {"room": "lobby"}}
        )
        assert answer["data"] == {"room": "lobby", "joined": True}
    who = await bob.request({"op": "call", "id": 9, "route": "chat.who", "data": {"room": "lobby"}})
    assert who["data"] == ["alice", "bob"]
    await bob.send({"op": "call", "id": 10, "route": "chat.say",
                    "data": {"room": "lobby", "text": "from the browser side"}})
    push, _ = await alice.recv_until(lambda m: m["op"] == "push")
    assert push["data"] == {"room": "lobby", "user": "bob", "text": "from the browser side"}
    await alice.send({"op": "call", "id": 11, "route": "chat.say",
                      "data": {"room": "lobby", "text": "from nc"}})
    push = await bob.recv_until(lambda m: m["op"] == "push" and m["data"]["user"] == "alice")
    assert push["data"] == {"room": "lobby", "user": "alice", "text": "from nc"}


# -- TLS -------------------------------------------------------------------------------


async def tls_raw(url: str, files: TlsFiles) -> RawClient:
    host_port = url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=files.client_context(), server_hostname="localhost"
    )
    return RawClient(reader, writer, "tcp" if url.startswith("tls://") else "tcp+len")


@pytest.mark.parametrize("scheme", ["tls", "tls+len"])
async def test_tls_stream_listeners(
    stack_factory: StackFactory, tls_files: TlsFiles, scheme: str
) -> None:
    stack = await stack_factory(tls_cert=tls_files.cert, tls_key=tls_files.key)
    c = await tls_raw(await listen(stack, f"{scheme}://127.0.0.1:0"), tls_files)
    stack.clients.append(c)
    assert (await c.request({"op": "auth", "token": stack.token("alice")}))["op"] == "ok"
    reply = await c.request({"op": "call", "id": 1, "route": "echo", "data": "secret"})
    assert reply == {"op": "reply", "id": 1, "data": "secret"}
    sock = c.writer.get_extra_info("ssl_object")
    assert sock is not None
    assert sock.version() in ("TLSv1.2", "TLSv1.3")


async def test_wss(
    stack_factory: StackFactory, tls_files: TlsFiles, opened: list[WsClient]
) -> None:
    stack = await stack_factory(tls_cert=tls_files.cert, tls_key=tls_files.key)
    url = await listen(stack, "wss://127.0.0.1:0/ws")
    c = await ws_client(opened, f"{url}?token={stack.token('alice')}", tls_files.client_context())
    assert await c.recv() == {"op": "ok", "user": "alice"}
    assert (await c.request({"op": "call", "id": 1, "route": "echo", "data": 7}))["data"] == 7


async def test_tls_handshake_counts_inside_the_auth_deadline(
    stack_factory: StackFactory, tls_files: TlsFiles
) -> None:
    """A handshake that never finishes, and a slow one, are closed at accept + auth_timeout_s."""
    stack = await stack_factory(auth_timeout_s=1.0, tls_cert=tls_files.cert, tls_key=tls_files.key)
    url = await listen(stack, "tls://127.0.0.1:0")
    host, port = stack.gateway.addresses[-1]
    started = time.monotonic()
    never_r, never_w = await asyncio.open_connection(host, port)
    slow_r, slow_w = await asyncio.open_connection(host, port)
    await asyncio.sleep(0.5)  # a slow client: half the budget before the handshake
    await slow_w.start_tls(tls_files.client_context(), server_hostname="localhost")
    bye = json.loads(await slow_r.readline())
    assert (bye["code"], bye["message"]) == ("unauthorized", "authentication timeout")
    assert await slow_r.read() == b""
    slow_elapsed = time.monotonic() - started
    assert await never_r.read() == b""
    never_elapsed = time.monotonic() - started
    assert 0.9 < slow_elapsed < 1.4, slow_elapsed  # not 0.5 + 1.0
    assert 0.9 < never_elapsed < 1.6, never_elapsed
    for writer in (never_w, slow_w):
        writer.close()
    assert url.startswith("tls://")


async def test_broken_tls_stream_ends_the_connection(
    stack_factory: StackFactory, tls_files: TlsFiles
) -> None:
    stack = await stack_factory(tls_cert=tls_files.cert, tls_key=tls_files.key)
    await listen(stack, "tls://127.0.0.1:0")
    host, port = stack.gateway.addresses[-1]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b'{"op":"ping"}\n' * 10)  # plain text where a TLS record belongs
    async with asyncio.timeout(3):
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
    writer.close()
    assert not stack.gateway.conns


# -- portao.client over WebSocket and TLS ------------------------------------------------


@pytest.mark.parametrize("scheme", ["ws", "wss", "tls", "tls+len"])
async def test_client_library_speaks_every_scheme(
    stack_factory: StackFactory, tls_files: TlsFiles, scheme: str
) -> None:
    stack = await stack_factory(tls_cert=tls_files.cert, tls_key=tls_files.key)
    path = "/ws" if scheme.startswith("ws") else ""
    url = (await listen(stack, f"{scheme}://127.0.0.1:0{path}")).replace("127.0.0.1", "localhost")
    context = tls_files.client_context()
    async with await portao_connect(url, token=stack.token("alice"), ssl_context=context) as c:
        assert c.user == "alice"
        assert await c.call("echo", {"é": [1]}) == {"é": [1]}
        await c.call("chat.join", {"room": "lobby"})
        await c.call("chat.say", {"room": "lobby", "text": "hi"})
        push = await c.next_push(timeout_s=5)
        assert (push.route, push.room) == ("chat.message", "lobby")
        raw = b'{"op":"ping","id":"raw"}'
        framed = {"tls": raw + b"\n", "tls+len": struct.pack(">I", len(raw)) + raw}
        await c.send_raw(framed.get(scheme, raw))  # on ws: one text message as it is
        assert await c.recv_raw(timeout_s=5) == {"op": "pong", "id": "raw"}


async def test_client_reconnects_over_websocket(stack: Stack) -> None:
    url = await listen(stack, "ws://127.0.0.1:0/ws")
    token = stack.token("alice", rooms=["lobby"])
    async with await portao_connect(url, token=token, reconnect=True) as c:
        await c.sub("lobby")
        [conn] = [conn for conn in stack.gateway.conns.values() if conn.session is not None
                  and conn.session.user == "alice"]
        conn.close()  # the gateway drops the link without a bye
        await eventually(lambda: conn.conn_id not in stack.gateway.conns)
        assert await c.call("echo", 5, timeout_s=10) == 5  # waits for the new link
        await eventually(lambda: "lobby" in stack.gateway.rooms)
        [again] = stack.gateway.rooms["lobby"]
        assert again != conn.conn_id
