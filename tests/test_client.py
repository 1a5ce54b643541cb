"""The client library against a tiny gateway stand-in built from portao's wire layer.

The stand-in answers like a gateway over real loopback sockets (both framings); the
end-to-end tests against the real gateway live elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from portao.client import (
    HELP,
    Backoff,
    Client,
    Push,
    _parse_command,
    connect,
    run_interactive,
)
from portao.errors import ConnectionClosed, ErrorCode, RequestError
from portao.wire.events import (
    Auth,
    BadMessage,
    Call,
    ClientMessage,
    FrameError,
    Ping,
    Send,
    Sub,
    Unsub,
)
from portao.wire.framing import STREAM_CODECS
from portao.wire.messages import (
    decode_message,
    encode_ack,
    encode_bye,
    encode_error,
    encode_ok,
    encode_pong,
    encode_push,
    encode_reply,
)

SCHEMES = ["tcp", "tcp+len"]


class FakeGateway:
    """Answers the routes below like a gateway would; counts auths and subs.

    echo: reply with data; push: push data to room lobby, then reply true;
    fail: handler_error; never: no answer; hold: answered, last first, after release;
    bye: send bye {code, retry_after_ms?} from data, then close; drop: close.
    """

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.port = 0
        self.auths = 0
        self.subs: list[str] = []
        self.held: list[tuple[int | str, bytes]] = []
        self.refuse_auth = False
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        codec = STREAM_CODECS[self.scheme](65536)
        self.writers.add(writer)
        try:
            while not codec.is_closed and not writer.is_closing():
                codec.receive_data(await reader.read(65536))
                for event in codec.events_received():
                    if isinstance(event, FrameError):
                        answers, close = [encode_error(event.code, event.message)], event.fatal
                    else:
                        answers, close = self.answer(decode_message(event.payload))
                    for payload in answers:
                        writer.write(codec.send_frame(payload))
                    if close:
                        writer.close()
                        break
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def answer(self, message: ClientMessage | BadMessage) -> tuple[list[bytes], bool]:
        match message:
            case BadMessage(code=code, message=text, id=id):
                return [encode_error(code, text, id)], False
            case Auth(token="good", id=id) if not self.refuse_auth:
                self.auths += 1
                return [encode_ok("ana", id)], False
            case Auth(id=id):
                return [encode_error(ErrorCode.UNAUTHORIZED, "bad token", id)], False
            case Call(id=id, route="echo", data=data):
                return [encode_reply(id, data)], False
            case Call(id=id, route="push", data=data):
                return [encode_push("news", data, room="lobby"), encode_reply(id, b"true")], False
            case Call(id=id, route="fail"):
                return [encode_error(ErrorCode.HANDLER_ERROR, "boom", id)], False
            case Call(route="never"):
                return [], False
            case Call(id=id, route="hold", data=data):
                self.held.append((id, data))
                return [], False
            case Call(id=id, route="release"):
                answers = [encode_reply(id, b'"released"')]
                answers += [encode_reply(held, data) for held, data in reversed(self.held)]
                self.held.clear()
                return answers, False
            case Call(route="bye", data=data):
                bye = json.loads(data)
                return [encode_bye(bye["code"], "closing", bye.get("retry_after_ms"))], True
            case Call(route="drop"):
                return [], True
            case Send(id=id):
                return ([] if id is None else [encode_ack(id)]), False
            case Sub(room="secret", id=id):
                return [encode_error(ErrorCode.FORBIDDEN, "not yours", id)], False
            case Sub(room=room, id=id):
                self.subs.append(room)
                return [encode_ok("ana", id)], False
            case Unsub(id=id):
                return [encode_ok("ana", id)], False
            case Ping(id=id):
                return [encode_pong(id)], False
        return [encode_error(ErrorCode.UNKNOWN_ROUTE, "no such route")], False


@pytest.fixture(params=SCHEMES)
async def gateway(request: pytest.FixtureRequest) -> AsyncIterator[FakeGateway]:
    server = FakeGateway(request.param)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(gateway: FakeGateway) -> AsyncIterator[Client]:
    async with await connect(gateway.url, token="good") as c:
        yield c


def frame(gateway: FakeGateway, payload: bytes) -> bytes:
    if gateway.scheme == "tcp":
        return payload + b"\n"
    return struct.pack(">I", len(payload)) + payload


async def test_round_trip(client: Client, gateway: FakeGateway) -> None:
    assert client.user == "ana"
    assert await client.call("echo", {"a": [1, "é"]}) == {"a": [1, "é"]}
    assert await client.call("echo") is None
    await client.send("echo", 1)
    await client.send("echo", 2, ack=False)
    await client.sub("lobby")
    await client.unsub("lobby")
    await client.ping()
    assert gateway.subs == ["lobby"]
    assert await client.auth("good") == "ana"


async def test_refused_token(gateway: FakeGateway) -> None:
    with pytest.raises(RequestError) as caught:
        await connect(gateway.url, token="bad")
    assert caught.value.code == ErrorCode.UNAUTHORIZED


async def test_errors_become_request_errors(client: Client) -> None:
    with pytest.raises(RequestError) as caught:
        await client.call("fail")
    assert (caught.value.code, caught.value.message) == ("handler_error", "boom")
    with pytest.raises(RequestError, match="forbidden"):
        await client.sub("secret")


async def test_pushes(client: Client) -> None:
    assert await client.call("push", 5) is True
    assert await client.next_push(timeout_s=5) == Push("news", 5, "lobby")
    await client.call("push", 6)
    async for push in client.pushes():
        assert push == Push("news", 6, "lobby")
        break


async def test_answers_dispatched_by_id_out_of_order(client: Client, gateway: FakeGateway) -> None:
    held = [asyncio.create_task(client.call("hold", n)) for n in range(3)]
    while len(gateway.held) < 3:
        await client.ping()
    assert await client.call("release") == "released"
    assert await asyncio.gather(*held) == [0, 1, 2]


async def test_request_raw(client: Client) -> None:
    assert await client.request_raw({"op": "ping", "id": "p"}) == {"op": "pong", "id": "p"}
    answer = await client.request_raw({"op": "nope"})
    assert answer["op"] == "error"
    assert answer["code"] == "bad_request"
    assert isinstance(answer["id"], int)


async def test_send_raw_and_recv_raw(client: Client, gateway: FakeGateway) -> None:
    await client.send_raw(frame(gateway, b"garbage"))
    answer = await client.recv_raw(timeout_s=5)
    assert answer["op"] == "error"
    assert answer["code"] == "bad_frame"
    assert "id" not in answer
    await client.ping()


async def test_duplicate_pending_id_is_refused(client: Client) -> None:
    never = asyncio.create_task(client.request_raw({"op": "call", "id": "x", "route": "never"}))
    await client.ping()
    with pytest.raises(ValueError, match="already pending"):
        await client.request_raw({"op": "ping", "id": "x"})
    never.cancel()


async def test_timeout_cleans_up(client: Client) -> None:
    with pytest.raises(TimeoutError):
        await client.call("never", timeout_s=0.05)
    assert await client.call("echo", 1) == 1


async def test_bye_ends_the_connection(client: Client) -> None:
    with pytest.raises(ConnectionClosed) as caught:
        await client.call("bye", {"code": "idle_timeout"})
    assert caught.value.code == "idle_timeout"
    assert client.bye is not None
    assert client.bye["code"] == "idle_timeout"
    with pytest.raises(ConnectionClosed):
        await client.ping()
    assert client.is_closed
    with pytest.raises(ConnectionClosed):
        await client.next_push()
    assert (await client.recv_raw())["op"] == "bye"
    with pytest.raises(ConnectionClosed):
        await client.recv_raw()


async def test_dropped_connection_fails_pending_calls(client: Client) -> None:
    never = asyncio.create_task(client.call("never"))
    with pytest.raises(ConnectionClosed) as caught:
        await client.call("drop")
    assert caught.value.code is None
    with pytest.raises(ConnectionClosed):
        await never


async def test_aclose_fails_pending_and_is_idempotent(gateway: FakeGateway) -> None:
    client = await connect(gateway.url)
    never = asyncio.create_task(client.call("never"))
    await client.ping()
    await client.aclose()
    await client.aclose()
    with pytest.raises(ConnectionClosed, match="client closed"):
        await never
    with pytest.raises(ConnectionClosed):
        await client.ping()


async def test_reconnect_reauths_and_rejoins(gateway: FakeGateway) -> None:
    async with await connect(gateway.url, token="good", reconnect=True) as client:
        await client.sub("lobby")
        with pytest.raises(ConnectionClosed):
            await client.call("drop")
        assert await client.call("echo", "again", timeout_s=10) == "again"
        assert gateway.auths == 2
        assert gateway.subs == ["lobby", "lobby"]
        assert not client.is_closed


async def test_reconnect_waits_for_the_gateway_to_return(gateway: FakeGateway) -> None:
    async with await connect(gateway.url, reconnect=True) as client:
        await gateway.stop()
        with pytest.raises(ConnectionClosed):
            await client.call("never")
        await gateway.start()
        assert await client.call("echo", 1, timeout_s=10) == 1


async def test_reconnect_stops_on_unauthorized(gateway: FakeGateway) -> None:
    async with await connect(gateway.url, token="good", reconnect=True) as client:
        with pytest.raises(ConnectionClosed):
            await client.call("bye", {"code": "unauthorized"})
        with pytest.raises(ConnectionClosed) as caught:
            await client.ping()
        assert caught.value.code == "unauthorized"
        assert gateway.auths == 1


async def test_reconnect_ends_when_the_token_is_refused(gateway: FakeGateway) -> None:
    async with await connect(gateway.url, token="good", reconnect=True) as client:
        gateway.refuse_auth = True
        with pytest.raises(ConnectionClosed):
            await client.call("drop")
        with pytest.raises(ConnectionClosed) as caught:
            await client.ping()
        assert caught.value.code == "unauthorized"
        assert "token refused" in caught.value.message
        assert client.is_closed


async def test_reconnect_after_shutdown_waits_retry_after(gateway: FakeGateway) -> None:
    async with await connect(gateway.url, reconnect=True) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionClosed, match="shutdown"):
            await client.call("bye", {"code": "shutdown", "retry_after_ms": 200})
        await client.ping()
        assert loop.time() - started >= 0.2


async def test_push_queue_is_bounded(gateway: FakeGateway) -> None:
    async with await connect(gateway.url, max_queued=2) as client:
        for n in range(3):
            await client.call("push", n)
        assert client.dropped == 1
        assert [(await client.next_push()).data for _ in range(2)] == [1, 2]


def test_backoff_doubles_caps_and_resets() -> None:
    backoff = Backoff(rand=lambda: 1.0)
    delays = [backoff.next_delay_s() for _ in range(10)]
    assert delays[:3] == pytest.approx([0.12, 0.24, 0.48])
    assert delays[-1] == pytest.approx(6.0)
    assert max(delays) == pytest.approx(6.0)
    backoff.reset()
    assert backoff.next_delay_s() == pytest.approx(0.12)
    assert Backoff(rand=lambda: 0.0).next_delay_s() == pytest.approx(0.1)


@pytest.mark.parametrize(
    "url", ["udp://127.0.0.1:1", "http://x:1", "tcp://127.0.0.1", "tcp://:80", "nonsense"]
)
async def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        await connect(url)


async def test_connection_refused(gateway: FakeGateway) -> None:
    await gateway.stop()
    with pytest.raises(ConnectionRefusedError):
        await connect(gateway.url, connect_timeout_s=5)


# -- the interactive client --------------------------------------------------------


async def test_run_interactive(client: Client) -> None:
    stdin = io.StringIO(
        'call echo {"a": 1}\n'
        "bogus\n"
        "\n"
        "# a comment\n"
        "send echo 1\n"
        "sub lobby\n"
        "call fail\n"
        'raw {"op": "ping", "id": "r"}\n'
        "call push 7\n"
        "call echo {bad\n"
        "ping\n"
    )
    stdout = io.StringIO()
    assert await run_interactive(client, stdin, stdout) == 0
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    ops = [(line["op"], line.get("data"), line.get("code")) for line in lines]
    assert ops[:5] == [
        ("reply", {"a": 1}, None),
        ("client_error", None, None),
        ("ack", None, None),
        ("ok", None, None),
        ("error", None, "handler_error"),
    ]
    assert sorted(ops[5:], key=str) == sorted(
        [
            ("pong", None, None),  # the raw ping
            ("push", 7, None),
            ("reply", True, None),
            ("client_error", None, None),
            ("pong", None, None),
        ],
        key=str,
    )
    assert {"op": "pong", "id": "r"} in lines


async def test_run_interactive_help_and_auth(gateway: FakeGateway) -> None:
    async with await connect(gateway.url) as client:
        stdout, notes = io.StringIO(), io.StringIO()
        stdin = io.StringIO("help\nauth good\ncall echo 1\n")
        assert await run_interactive(client, stdin, stdout, notes) == 0
    assert notes.getvalue() == HELP + "\n"  # help text stays off the JSON lines
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [line["op"] for line in lines] == ["ok", "reply"]
    assert gateway.auths == 1


async def test_run_interactive_quit_and_closed(client: Client) -> None:
    stdout = io.StringIO()
    assert await run_interactive(client, io.StringIO("quit\nping\n"), stdout) == 0
    assert stdout.getvalue() == ""
    stdin = io.StringIO('call bye {"code": "overloaded"}\nping\n')
    assert await run_interactive(client, stdin, stdout) == 1
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert sorted(lines, key=str) == [
        {"op": "bye", "code": "overloaded", "message": "closing"},
        {"op": "closed", "code": "overloaded", "message": "closing"},
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("call r", {"op": "call", "route": "r", "data": None}),
        ('send r {"a": [1, 2]}', {"op": "send", "route": "r", "data": {"a": [1, 2]}}),
        ("sub room", {"op": "sub", "room": "room"}),
        ("unsub room", {"op": "unsub", "room": "room"}),
        ("  ping  ", {"op": "ping"}),
        ("quit", {"op": "quit"}),
        ("help", {"op": "help"}),
        ("auth a.b.c", {"op": "auth", "token": "a.b.c"}),
        ('raw {"op": "x"}', {"op": "raw", "message": {"op": "x"}}),
        ("", {}),
        ("# note", {}),
    ],
)
def test_parse_command(line: str, expected: dict[str, Any]) -> None:
    assert _parse_command(line) == expected


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("call", "cannot parse"),
        ("sub", "cannot parse"),
        ("sub a b", "cannot parse"),
        ("ping x", "cannot parse"),
        ("call r {", "invalid JSON"),
        ("raw [1]", "JSON object"),
        ("raw", "cannot parse"),
        ("auth", "cannot parse"),
        ("fly me", "commands: call ROUTE"),
        ("fly me", "help"),
    ],
)
def test_parse_command_errors(line: str, error: str) -> None:
    result = _parse_command(line)
    assert isinstance(result, str)
    assert error in result
