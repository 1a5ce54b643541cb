"""Every op, error and bye code over real loopback sockets, on both TCP framings."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from typing import Any

import pytest

from portao.gateway import connection
from portao.session.auth import mint_token
from portao.worker.app import App
from tests.gateway.conftest import SECRET, RawClient, Stack, StackFactory, eventually

FRAMINGS = pytest.mark.parametrize("index", [0, 1], ids=["tcp", "tcp+len"])


@FRAMINGS
async def test_every_op(stack: Stack, index: int) -> None:
    c = await stack.raw(index)
    assert await c.request({"op": "ping"}) == {"op": "pong"}
    assert await c.request({"op": "ping", "id": "p"}) == {"op": "pong", "id": "p"}
    ok = await c.request({"op": "auth", "token": stack.token("alice", rooms=["chat.*"]), "id": 1})
    assert ok == {"op": "ok", "user": "alice", "id": 1}
    reply = await c.request({"op": "call", "id": 2, "route": "echo", "data": {"a": [1, "é"]}})
    assert reply == {"op": "reply", "id": 2, "data": {"a": [1, "é"]}}
    assert await c.request({"op": "call", "id": "n", "route": "echo", "data": None}) == {
        "op": "reply",
        "id": "n",
        "data": None,
    }
    assert await c.request({"op": "send", "id": 3, "route": "echo", "data": 1}) == {
        "op": "ack",
        "id": 3,
    }
    assert await c.request({"op": "sub", "room": "chat.lobby", "id": 4}) == {
        "op": "ok",
        "user": "alice",
        "id": 4,
    }
    await c.send({"op": "call", "id": 5, "route": "chat.say",
                  "data": {"room": "chat.lobby", "text": "hi"}})
    push, _ = await c.recv_until(lambda m: m["op"] == "push")
    assert push == {
        "op": "push",
        "route": "chat.message",
        "data": {"room": "chat.lobby", "user": "alice", "text": "hi"},
        "room": "chat.lobby",
    }
    reply, _ = await c.recv_until(lambda m: m.get("id") == 5)
    assert reply == {"op": "reply", "id": 5, "data": {"delivered": True}}
    assert await c.request({"op": "unsub", "room": "chat.lobby", "id": 6}) == {
        "op": "ok",
        "user": "alice",
        "id": 6,
    }
    # a send without id gets nothing back: the next answer is the ping's
    await c.send({"op": "send", "route": "echo", "data": 1})
    assert await c.request({"op": "ping", "id": 7}) == {"op": "pong", "id": 7}


async def test_raw_data_passes_untouched(stack: Stack) -> None:
    """The gateway forwards the client's `data` bytes as they came, not re-encoded."""
    await stack.broker.register_routes(["raw.only"])  # no worker consumes it
    c = await stack.authed()
    data = b'{"z":1,  "a":[1.50,"\\u00e9"]}'
    await c.send_bytes(b'{"op":"send","id":1,"route":"raw.only","data":' + data + b"}")
    assert await c.recv() == {"op": "ack", "id": 1}
    [delivery] = await stack.broker.fetch("test", ["raw.only"], 10, 1.0)
    assert delivery.envelope.data == data
    assert delivery.envelope.user == "alice"
    assert delivery.envelope.kind == "send"


@FRAMINGS
@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "bad_frame"),
        (b"\xff\xfe{}", "bad_frame"),
        (b"[1, 2]", "bad_frame"),
        (b"42", "bad_frame"),
        (b'{"id": 1}', "bad_request"),
        (b'{"op": "nope", "id": 1}', "bad_request"),
        (b'{"op": "call", "id": 1, "route": "echo"}', "bad_request"),
        (b'{"op": "call", "id": 1, "route": "bad name!", "data": 1}', "bad_request"),
        (b'{"op": "call", "id": 1, "route": "echo", "data": 1, "extra": 2}', "bad_request"),
        (b'{"op": "call", "id": true, "route": "echo", "data": 1}', "bad_request"),
        (b'{"op": "call", "id": [1], "route": "echo", "data": 1}', "bad_request"),
        (b'{"op": "sub", "room": ""}', "bad_request"),
        (b'{"op": "send", "route": 5, "data": 1}', "bad_request"),
        (b'{"op": "call", "id": 1, "route": "echo", "data": [1e400]}', "bad_request"),
    ],
)
async def test_bad_input_keeps_connection(
    stack: Stack, index: int, payload: bytes, code: str
) -> None:
    c = await stack.raw(index)
    await c.send({"op": "auth", "token": stack.token()})
    assert (await c.recv())["op"] == "ok"
    await c.send_bytes(payload)
    answer = await c.recv()
    assert answer["op"] == "error"
    assert answer["code"] == code
    assert answer["message"]
    # the connection stays usable
    assert await c.request({"op": "call", "id": 9, "route": "echo", "data": 1}) == {
        "op": "reply",
        "id": 9,
        "data": 1,
    }


async def test_error_carries_id_when_readable(stack: Stack) -> None:
    c = await stack.authed()
    answer = await c.request({"op": "call", "id": 7, "route": "bad name", "data": 1})
    assert answer["code"] == "bad_request"
    assert answer["id"] == 7
    # too deep to decode: the id is still found when it is the last field
    deep = b"[" * 5000 + b"]" * 5000
    await c.send_bytes(b'{"op":"call","route":"echo","data":%s,"id":8}' % deep)
    answer = await c.recv()
    assert (answer["code"], answer["id"]) == ("bad_request", 8)
    await c.send_bytes(b'{"op":"call","id":9,"route":"echo","data":-1E+400}')
    answer = await c.recv()
    assert (answer["code"], answer["id"]) == ("bad_request", 9)


@FRAMINGS
async def test_split_and_batched_frames(stack: Stack, index: int) -> None:
    c = await stack.authed(index=index)
    frames = b""
    for i in range(50):
        body = json.dumps({"op": "call", "id": i, "route": "echo", "data": i}).encode()
        frames += body + b"\n" if index == 0 else struct.pack(">I", len(body)) + body
    # one byte at a time for the first frames, then everything else in one write
    for byte in frames[:200]:
        await c.send_raw(bytes([byte]))
    await c.send_raw(frames[200:])
    got = {}
    for _ in range(50):
        message = await c.recv()
        got[message["id"]] = message["data"]
    assert got == {i: i for i in range(50)}


async def test_oversized_newline_frame_is_skipped(stack_factory: StackFactory) -> None:
    stack = await stack_factory(max_frame_bytes=1024)
    c = await stack.authed()
    huge = json.dumps({"op": "call", "id": 1, "route": "echo", "data": "x" * 5000}).encode()
    await c.send_raw(huge + b"\n")
    answer = await c.recv()
    assert answer["op"] == "error"
    assert answer["code"] == "too_large"
    # exactly at the limit is fine
    body = {"op": "call", "id": 2, "route": "echo", "data": ""}
    pad = 1024 - len(json.dumps(body).encode())
    body["data"] = "y" * pad
    raw = json.dumps(body).encode()
    assert len(raw) == 1024
    await c.send_raw(raw + b"\n")
    assert (await c.recv())["id"] == 2


async def test_oversized_length_frame_ends_connection(stack_factory: StackFactory) -> None:
    stack = await stack_factory(max_frame_bytes=1024)
    c = await stack.raw(1)
    await c.send_raw(struct.pack(">I", 1025) + b"{")
    bye = await c.recv()
    assert bye["op"] == "bye"
    assert bye["code"] == "too_large"
    assert await c.closed()


async def test_unauthorized_before_auth_and_stays_open(stack: Stack) -> None:
    c = await stack.raw()
    for message in (
        {"op": "call", "id": 1, "route": "echo", "data": 1},
        {"op": "send", "id": 2, "route": "echo", "data": 1},
        {"op": "sub", "id": 3, "room": "r"},
        {"op": "unsub", "id": 4, "room": "r"},
    ):
        answer = await c.request(message)
        assert answer["code"] == "unauthorized"
        assert answer["id"] == message["id"]
    assert (await c.request({"op": "auth", "token": stack.token()}))["op"] == "ok"


async def test_forged_token_and_three_strikes(stack: Stack) -> None:
    c = await stack.raw()
    forged = mint_token("another-secret-" + "y" * 32, "mallory", now=time.time())
    for attempt in range(2):
        answer = await c.request({"op": "auth", "token": forged, "id": attempt})
        assert answer["code"] == "unauthorized"
    await c.send({"op": "auth", "token": "garbage"})
    bye = await c.recv()
    assert bye["op"] == "bye"
    assert bye["code"] == "unauthorized"
    assert await c.closed()


async def test_expired_token_refused(stack: Stack) -> None:
    c = await stack.raw()
    token = mint_token(SECRET, "alice", ttl_s=-10, now=time.time())
    answer = await c.request({"op": "auth", "token": token})
    assert answer["code"] == "unauthorized"


async def test_token_expiring_mid_connection(stack: Stack) -> None:
    c = await stack.authed(ttl_s=1.0)
    assert (await c.request({"op": "ping"}))["op"] == "pong"
    bye = await c.recv(timeout_s=5)
    assert bye["op"] == "bye"
    assert bye["code"] == "unauthorized"
    assert await c.closed()


async def test_a_far_token_expiry_holds_no_timer_of_its_own_until_near(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle connections wait for their far deadlines under one timer (FarDeadlines);
    the expiry is still on time, and a connection that closes leaves nothing behind."""
    monkeypatch.setattr(connection, "TIMER_HORIZON_S", 1.0)
    expiring = await stack.authed("alice", ttl_s=2.5)
    leaving = await stack.authed("bob", ttl_s=30)
    authed_at = time.monotonic()
    conns = {c.session.user: c for c in stack.gateway.conns.values() if c.session}
    for conn in conns.values():
        assert conn._timer is None
        assert conn._far
    buckets = stack.gateway.far_deadlines._buckets
    assert conns["bob"].conn_id in buckets[conns["bob"]._far]
    leaving.writer.close()
    await eventually(lambda: conns["bob"].conn_id not in stack.gateway.conns)
    assert all(conns["bob"].conn_id not in bucket for bucket in buckets.values())

    bye = await expiring.recv(timeout_s=5)
    assert (bye["op"], bye["code"]) == ("bye", "unauthorized")
    assert 2.0 < time.monotonic() - authed_at < 4.0
    assert await expiring.closed()
    assert not buckets


async def test_refresh_extends_and_other_sub_forbidden(stack: Stack) -> None:
    c = await stack.authed(ttl_s=1.0)
    fresh = await c.request({"op": "auth", "token": stack.token("alice", ttl_s=60), "id": 1})
    assert fresh == {"op": "ok", "user": "alice", "id": 1}
    other = await c.request({"op": "auth", "token": stack.token("bob"), "id": 2})
    assert other["code"] == "forbidden"
    await asyncio.sleep(1.5)  # past the first token's expiry: still open
    assert (await c.request({"op": "call", "id": 3, "route": "echo", "data": 3}))["data"] == 3


async def test_rooms_claim_gates_sub(stack: Stack) -> None:
    c = await stack.authed("alice", rooms=["team:*:chat", "lobby"])
    assert (await c.request({"op": "sub", "room": "lobby", "id": 1}))["op"] == "ok"
    assert (await c.request({"op": "sub", "room": "team:a.b:chat", "id": 2}))["op"] == "ok"
    denied = await c.request({"op": "sub", "room": "team:a:chatter", "id": 3})
    assert denied["code"] == "forbidden"
    nobody = await stack.authed("bob")  # no rooms claim: no sub at all
    assert (await nobody.request({"op": "sub", "room": "lobby", "id": 1}))["code"] == "forbidden"


async def test_auth_deadline_closes_silent_socket(stack_factory: StackFactory) -> None:
    stack = await stack_factory(auth_timeout_s=0.5)
    c = await stack.raw()
    bye = await c.recv()
    assert bye["op"] == "bye"
    assert bye["code"] == "unauthorized"
    assert await c.closed()
    await eventually(lambda: not stack.gateway.conns)


async def test_idle_timeout(stack_factory: StackFactory) -> None:
    stack = await stack_factory(idle_timeout_s=0.5)
    c = await stack.authed()
    bye = await c.recv()
    assert bye["code"] == "idle_timeout"
    assert await c.closed()


async def test_duplicate_pending_id_has_no_id(stack_factory: StackFactory) -> None:
    slow = App("slow")
    release = asyncio.Event()

    @slow.route("wait")
    async def wait(ctx: Any, data: Any) -> Any:
        await release.wait()
        return "done"

    stack = await stack_factory(app=slow)
    c = await stack.authed()
    await c.send({"op": "call", "id": 1, "route": "wait", "data": None})
    dup = await c.request({"op": "call", "id": 1, "route": "wait", "data": None})
    assert dup["code"] == "bad_request"
    assert "id" not in dup
    release.set()
    assert await c.recv() == {"op": "reply", "id": 1, "data": "done"}


async def test_pending_call_cap(stack_factory: StackFactory) -> None:
    slow = App("slow")
    release = asyncio.Event()

    @slow.route("wait")
    async def wait(ctx: Any, data: Any) -> Any:
        await release.wait()
        return data

    stack = await stack_factory(app=slow, max_pending_calls=3)
    c = await stack.authed()
    for i in range(3):
        await c.send({"op": "call", "id": i, "route": "wait", "data": i})
    over = await c.request({"op": "call", "id": 3, "route": "wait", "data": 3})
    assert over == {"op": "error", "code": "overloaded", "id": 3, "message": over["message"]}
    release.set()
    got = sorted([(await c.recv())["id"] for _ in range(3)])
    assert got == [0, 1, 2]


async def test_unknown_route(stack: Stack) -> None:
    c = await stack.authed()
    answer = await c.request({"op": "call", "id": 1, "route": "nobody.serves.this", "data": 1})
    assert answer["code"] == "unknown_route"
    assert answer["id"] == 1
    send = await c.request({"op": "send", "id": 2, "route": "nobody.serves.this", "data": 1})
    assert send["code"] == "unknown_route"


async def test_call_timeout(stack_factory: StackFactory) -> None:
    slow = App("slow")

    @slow.route("never")
    async def never(ctx: Any, data: Any) -> Any:
        await asyncio.sleep(30)

    stack = await stack_factory(app=slow, call_timeout_s=0.3, handler_timeout_s=5)
    c = await stack.authed()
    started = time.monotonic()
    answer = await c.request({"op": "call", "id": 1, "route": "never", "data": None})
    assert answer["code"] == "timeout"
    assert answer["id"] == 1
    assert 0.25 < time.monotonic() - started < 2.0
    assert len(stack.gateway.pending) == 0


async def test_handler_error_after_retries(stack: Stack) -> None:
    c = await stack.authed()
    answer = await c.request({"op": "call", "id": 1, "route": "fail", "data": None})
    assert answer["code"] == "handler_error"
    assert answer["id"] == 1
    letters = await stack.broker.dead_letters("fail")
    assert len(letters) == 1
    assert "RuntimeError" in letters[0].error


async def test_rate_limit_pauses_reading(stack_factory: StackFactory) -> None:
    stack = await stack_factory(rate_limit_per_s=20, rate_burst=5)
    c = await stack.authed()  # the auth took one token
    for i in range(10):
        await c.send({"op": "ping", "id": i})
    answers = [await c.recv() for _ in range(10)]
    limited = [a for a in answers if a["op"] == "error"]
    assert len(limited) == 1
    assert limited[0]["code"] == "rate_limited"
    # the others were answered (paused, not dropped), in order
    pongs = [a["id"] for a in answers if a["op"] == "pong"]
    assert pongs == sorted(pongs)
    assert len(pongs) == 9
    assert limited[0]["id"] not in pongs


async def test_connection_cap(stack_factory: StackFactory) -> None:
    stack = await stack_factory(max_connections=2)
    await stack.raw()
    await stack.raw()
    await eventually(lambda: len(stack.gateway.conns) == 2)
    third = await stack.raw()
    bye = await third.recv()
    assert bye["code"] == "overloaded"
    assert await third.closed()


async def test_slow_consumer(stack_factory: StackFactory) -> None:
    stack = await stack_factory(outbound_buffer_bytes=64 * 1024)
    c = await stack.authed("alice", rooms=["*"])
    assert (await c.request({"op": "sub", "room": "flood", "id": 1}))["op"] == "ok"
    # never read; flood the room from the broker side until the gateway gives up
    from portao.envelope import Push

    big = json.dumps("x" * 32000).encode()
    for _ in range(2000):  # kernel buffers on loopback take several MiB first
        if not stack.gateway.conns:
            break
        await stack.broker.publish_room("flood", Push(route="r", data=big, room="flood"))
        await asyncio.sleep(0.001)
    await eventually(lambda: not stack.gateway.conns, timeout_s=10)
    assert stack.gateway.stats.slow_consumers == 1


async def test_closed_connection_leaves_nothing(stack_factory: StackFactory) -> None:
    slow = App("slow")
    release = asyncio.Event()

    @slow.route("wait")
    async def wait(ctx: Any, data: Any) -> Any:
        await release.wait()
        return data

    @slow.route("join")
    async def join(ctx: Any, data: Any) -> Any:
        await ctx.join("lobby")
        return True

    stack = await stack_factory(app=slow)
    c = await stack.authed("alice", rooms=["*"])
    assert (await c.request({"op": "sub", "room": "r1", "id": 1}))["op"] == "ok"
    assert (await c.request({"op": "call", "id": 2, "route": "join", "data": None}))["data"]
    await c.send({"op": "call", "id": 3, "route": "wait", "data": None})
    await eventually(lambda: len(stack.gateway.pending) == 1)
    assert [m.user for m in await stack.broker.room_members("lobby")] == ["alice"]
    # A reset, not a FIN: a FIN may be a half-close, whose calls are still answered
    # (test_half_close.py).
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await c.aclose()
    await eventually(lambda: not stack.gateway.conns)
    assert len(stack.gateway.pending) == 0
    assert stack.gateway.rooms == {}
    assert stack.gateway.users == {}
    await eventually(lambda: True)
    for room in ("r1", "lobby"):
        for _ in range(100):
            if not await stack.broker.room_members(room):
                break
            await asyncio.sleep(0.01)
        assert await stack.broker.room_members(room) == []
    release.set()  # the call still runs; its reply is dropped and counted
    await eventually(lambda: stack.gateway.stats.late_replies == 1)


async def test_two_users_chat_and_who(stack: Stack) -> None:
    alice = await stack.authed("alice")
    bob = await stack.authed("bob")
    for i, c in enumerate((alice, bob)):
        answer = await c.request(
            {"op": "call", "id": i, "route": "chat.join", "data": {"room": "lobby"}}
        )
        assert answer["data"] == {"room": "lobby", "joined": True}
    who = await alice.request({"op": "call", "id": 9, "route": "chat.who",
                               "data": {"room": "lobby"}})
    assert who["data"] == ["alice", "bob"]
    await bob.send({"op": "call", "id": 10, "route": "chat.say",
                    "data": {"room": "lobby", "text": "hello"}})
    push, _ = await alice.recv_until(lambda m: m["op"] == "push")
    assert push["data"] == {"room": "lobby", "user": "bob", "text": "hello"}


async def test_push_user_reaches_every_connection(stack_factory: StackFactory) -> None:
    pusher = App("pusher")

    @pusher.route("poke")
    async def poke(ctx: Any, data: Any) -> Any:
        await ctx.push_user(data, "poked", {"by": ctx.user})
        return True

    stack = await stack_factory(app=pusher)
    bob1 = await stack.authed("bob")
    bob2 = await stack.authed("bob")
    alice = await stack.authed("alice")
    await alice.request({"op": "call", "id": 1, "route": "poke", "data": "bob"})
    for c in (bob1, bob2):
        assert await c.recv() == {"op": "push", "route": "poked", "data": {"by": "alice"}}
    # One connection left of two, then none: the user index follows.
    await bob2.aclose()
    await eventually(lambda: len(stack.gateway.conns) == 2)
    await alice.request({"op": "call", "id": 2, "route": "poke", "data": "bob"})
    assert await bob1.recv() == {"op": "push", "route": "poked", "data": {"by": "alice"}}
    await bob1.aclose()
    await eventually(lambda: len(stack.gateway.conns) == 1)
    assert list(stack.gateway.users) == ["alice"]


async def test_graceful_shutdown_with_calls_in_flight(stack_factory: StackFactory) -> None:
    slow = App("slow")

    @slow.route("nap")
    async def nap(ctx: Any, data: Any) -> Any:
        await asyncio.sleep(data)
        return data

    stack = await stack_factory(app=slow, drain_timeout_s=1.5)
    busy = await stack.authed("alice")
    idle = await stack.authed("bob")
    await busy.send({"op": "call", "id": 1, "route": "nap", "data": 0.3})
    await busy.send({"op": "call", "id": 2, "route": "nap", "data": 10})
    await eventually(lambda: len(stack.gateway.pending) == 2)
    address = stack.address()
    drain = asyncio.create_task(stack.gateway.drain())
    bye = await busy.recv()
    assert bye["op"] == "bye"
    assert bye["code"] == "shutdown"
    assert bye["retry_after_ms"] > 0
    assert (await idle.recv())["code"] == "shutdown"
    assert await idle.closed()  # nothing in flight: closed at once
    refused = await busy.request({"op": "call", "id": 3, "route": "nap", "data": 0})
    assert refused["code"] == "shutdown"
    assert refused["id"] == 3
    assert await busy.recv() == {"op": "reply", "id": 1, "data": 0.3}
    last = await busy.recv(timeout_s=5)
    assert last["code"] == "shutdown"
    assert last["id"] == 2
    assert await busy.closed()
    await drain
    # new connections are refused once draining
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*address)


async def test_many_connections_many_calls(stack: Stack) -> None:
    clients: list[RawClient] = [await stack.authed(f"u{i}") for i in range(50)]

    async def run(c: RawClient, n: int) -> list[Any]:
        for i in range(n):
            await c.send({"op": "call", "id": i, "route": "echo", "data": [i, "x"]})
        out = [await c.recv() for _ in range(n)]
        return sorted(m["id"] for m in out)

    results = await asyncio.gather(*(run(c, 40) for c in clients))
    assert all(r == list(range(40)) for r in results)


async def test_accepted_sockets_have_keepalive(stack: Stack) -> None:
    import socket

    await stack.authed()
    [conn] = stack.gateway.conns.values()
    assert conn._transport is not None
    sock = conn._transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
