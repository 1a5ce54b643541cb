"""The broker contract: every backend (memory, Redis, RabbitMQ) passes these.

Timings come from CONTRACT_SETTINGS (visibility 0.5 s, presence 1 s). Waits are
bounded; where a test must see that nothing arrives, it waits a short fixed window.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from portao.broker.base import DeadLetter, Member
from portao.envelope import ErrorReply, InboxMessage, Push, Reply, new_gateway_id
from portao.errors import QueueFull, UnknownRoute
from tests.broker.conftest import Backend, beat, fetch_n, make_envelope, read_n

NOTHING_S = 0.3  # how long a test watches for something that must not arrive


def _push(
    route: str = "note",
    data: bytes = b'"hi"',
    *,
    conn: int | None = None,
    user: str | None = None,
    room: str | None = None,
) -> Push:
    return Push(route=route, data=data, conn=conn, user=user, room=room)


async def _gateway(backend: Backend) -> str:
    gateway_id = new_gateway_id()
    await backend.broker.open_inbox(gateway_id)
    await beat(backend, gateway_id)
    return gateway_id


# -- link -----------------------------------------------------------------------------


async def test_ready_after_connect_and_connect_is_idempotent(backend: Backend) -> None:
    assert backend.broker.is_ready()
    await backend.broker.connect()
    assert backend.broker.is_ready()


# -- route queues ---------------------------------------------------------------------


async def test_publish_to_unregistered_route_is_unknown(backend: Backend) -> None:
    await backend.broker.register_routes(["known"])
    with pytest.raises(UnknownRoute):
        await backend.broker.publish(make_envelope("never.registered"))


async def test_round_trip_keeps_the_envelope_intact(backend: Backend) -> None:
    broker = backend.broker
    await broker.register_routes(["echo"])
    sent = make_envelope("echo", b'{"text": "ol\xc3\xa1", "n": [1, 2.5, null]}')
    await broker.publish(sent)

    [delivery] = await fetch_n(broker, "w1", ["echo"], 1)
    assert delivery.envelope == sent
    assert delivery.envelope.data == sent.data
    assert delivery.deliveries == 1

    await broker.ack("w1", [delivery])
    assert await broker.fetch("w1", ["echo"], 10, 0.1) == []


async def test_one_fetch_serves_several_routes(backend: Backend) -> None:
    broker = backend.broker
    await broker.register_routes(["a", "b", "idle"])
    sent = [make_envelope(route) for route in ("a", "b", "a", "b")]
    for envelope in sent:
        await broker.publish(envelope)

    got = await fetch_n(broker, "w1", ["a", "b", "idle"], 4)
    assert sorted(d.envelope.id for d in got) == sorted(e.id for e in sent)
    for route in ("a", "b"):
        in_route = [d.envelope.id for d in got if d.envelope.route == route]
        assert in_route == [e.id for e in sent if e.route == route]
    await broker.ack("w1", got)


async def test_one_consumer_gets_a_route_in_order(backend: Backend) -> None:
    broker = backend.broker
    await broker.register_routes(["fifo"])
    sent = [make_envelope("fifo", str(i).encode()) for i in range(8)]
    for envelope in sent:
        await broker.publish(envelope)

    got = await fetch_n(broker, "w1", ["fifo"], len(sent))
    assert [d.envelope for d in got] == sent
    await broker.ack("w1", got)


async def test_fetch_on_an_empty_queue_returns_nothing_after_its_timeout(
    backend: Backend,
) -> None:
    await backend.broker.register_routes(["empty"])
    started = time.monotonic()
    assert await backend.broker.fetch("w1", ["empty"], 10, 0.3) == []
    assert 0.25 <= time.monotonic() - started < 0.3 + 0.5


async def test_two_consumers_never_get_the_same_message(backend: Backend) -> None:
    broker = backend.broker
    await broker.register_routes(["shared"])
    sent = [make_envelope("shared") for _ in range(backend.settings.max_queue_length)]
    for envelope in sent:
        await broker.publish(envelope)
    seen: dict[str, list[str]] = {"w1": [], "w2": []}
    deadline = time.monotonic() + 3.0

    async def consume(consumer: str) -> None:
        while sum(map(len, seen.values())) < len(sent) and time.monotonic() < deadline:
            got = await broker.fetch(consumer, ["shared"], 3, 0.2)
            seen[consumer] += [d.envelope.id for d in got]
            await broker.ack(consumer, got)

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consume("w1"))
        tasks.create_task(consume("w2"))

    assert not set(seen["w1"]) & set(seen["w2"])
    assert sorted(seen["w1"] + seen["w2"]) == sorted(e.id for e in sent)


async def test_unacked_message_is_reclaimed_after_the_visibility_timeout(
    backend: Backend,
) -> None:
    broker, visibility_s = backend.broker, backend.settings.visibility_timeout_s
    await broker.register_routes(["work"])
    sent = make_envelope("work")
    await broker.publish(sent)

    [first] = await fetch_n(broker, "dead-worker", ["work"], 1)
    claimed = time.monotonic()
    assert await broker.fetch("w2", ["work"], 10, 0.1) == []  # still held

    [again] = await fetch_n(broker, "w2", ["work"], 1, within_s=visibility_s * 8)
    assert time.monotonic() - claimed >= visibility_s * 0.9
    assert again.envelope == sent
    assert (first.deliveries, again.deliveries) == (1, 2)
    await broker.ack("w2", [again])


async def test_extend_keeps_the_claim_past_the_visibility_timeout(backend: Backend) -> None:
    broker, visibility_s = backend.broker, backend.settings.visibility_timeout_s
    await broker.register_routes(["long"])
    await broker.publish(make_envelope("long"))
    [held] = await fetch_n(broker, "w1", ["long"], 1)

    until = time.monotonic() + 3 * visibility_s
    while time.monotonic() < until:
        assert await broker.extend("w1", [held]) == []
        assert await broker.fetch("w2", ["long"], 10, visibility_s / 3) == []

    await broker.ack("w1", [held])
    assert await broker.fetch("w2", ["long"], 10, visibility_s * 1.5) == []


async def test_extend_reports_a_lost_claim_and_a_stale_ack_is_ignored(
    backend: Backend,
) -> None:
    broker, visibility_s = backend.broker, backend.settings.visibility_timeout_s
    await broker.register_routes(["frozen"])
    await broker.publish(make_envelope("frozen"))
    [stale] = await fetch_n(broker, "frozen-worker", ["frozen"], 1)
    [current] = await fetch_n(broker, "w2", ["frozen"], 1, within_s=visibility_s * 8)
    assert current.deliveries == 2

    assert await broker.extend("frozen-worker", [stale]) == [stale]
    await broker.ack("frozen-worker", [stale])  # ignored: w2 holds it now
    assert await broker.extend("w2", [current]) == []

    await broker.ack("w2", [current])
    assert await broker.fetch("w3", ["frozen"], 10, visibility_s * 1.5) == []


async def test_acked_message_is_gone_for_good(backend: Backend) -> None:
    broker, visibility_s = backend.broker, backend.settings.visibility_timeout_s
    await broker.register_routes(["done"])
    await broker.publish(make_envelope("done"))
    got = await fetch_n(broker, "w1", ["done"], 1)
    await broker.ack("w1", got)
    assert await broker.fetch("w2", ["done"], 10, visibility_s * 1.5) == []


async def test_dead_letters_keep_the_error_and_are_not_redelivered(backend: Backend) -> None:
    broker, visibility_s = backend.broker, backend.settings.visibility_timeout_s
    await broker.register_routes(["poison"])
    first, second = make_envelope("poison", b"1"), make_envelope("poison", b"2")
    await broker.publish(first)
    await broker.publish(second)
    a, b = await fetch_n(broker, "w1", ["poison"], 2)
    await broker.dead_letter("w1", a, "ValueError: bad input")
    await broker.dead_letter("w1", b, "KeyError: 'x'")

    assert await broker.dead_letters("poison") == [
        DeadLetter(first, "ValueError: bad input"),
        DeadLetter(second, "KeyError: 'x'"),
    ]
    assert await broker.dead_letters("poison", limit=1) == [
        DeadLetter(first, "ValueError: bad input")
    ]
    assert await broker.fetch("w2", ["poison"], 10, visibility_s * 1.5) == []


async def test_queue_bound_counts_undelivered_and_pending(backend: Backend) -> None:
    if backend.name == "amqp":
        pytest.skip(
            "RabbitMQ's x-max-length counts ready messages; unacked ones are bounded by "
            "prefetch (test_amqp.py covers its bound: "
            "test_a_full_queue_refuses_and_takes_again_once_drained)"
        )
    broker, bound = backend.broker, backend.settings.max_queue_length
    await broker.register_routes(["bounded"])
    for _ in range(bound // 2):
        await broker.publish(make_envelope("bounded"))
    pending = await fetch_n(broker, "w1", ["bounded"], bound // 2)
    for _ in range(bound - bound // 2):
        await broker.publish(make_envelope("bounded"))
    with pytest.raises(QueueFull):
        await broker.publish(make_envelope("bounded"))

    await broker.ack("w1", pending[:2])
    for _ in range(2):
        await broker.publish(make_envelope("bounded"))
    with pytest.raises(QueueFull):
        await broker.publish(make_envelope("bounded"))


# -- inboxes and bindings --------------------------------------------------------------


async def test_inbox_keeps_the_order_of_direct_messages(backend: Backend) -> None:
    gateway_id = await _gateway(backend)
    sent: list[InboxMessage] = []
    for i in range(20):
        match i % 3:
            case 0:
                sent.append(Reply(ref=f"m{i}", conn=i, data=str(i).encode()))
            case 1:
                sent.append(ErrorReply(ref=f"m{i}", conn=i, code="handler_error", message="x"))
            case _:
                sent.append(_push(data=str(i).encode(), conn=i))
    for message in sent:
        await backend.broker.send_to_gateway(gateway_id, message)
    assert await read_n(backend.broker, gateway_id, len(sent)) == sent


async def test_send_to_user_reaches_every_bound_gateway_and_no_other(backend: Backend) -> None:
    broker = backend.broker
    first, second, other = [await _gateway(backend) for _ in range(3)]
    await broker.bind_user(first, "alice")
    await broker.bind_user(second, "alice")
    await broker.bind_user(other, "bob")

    push = _push(user="alice")
    await broker.send_to_user("alice", push)
    await broker.send_to_user("nobody", _push(user="nobody"))
    marker = _push(route="marker", conn=1)
    for gateway_id in (first, second, other):
        await broker.send_to_gateway(gateway_id, marker)

    assert await read_n(broker, first, 2) == [push, marker]
    assert await read_n(broker, second, 2) == [push, marker]
    assert await read_n(broker, other, 1) == [marker]


async def test_send_to_a_gone_gateway_is_dropped_silently(backend: Backend) -> None:
    gateway_id = await _gateway(backend)
    await backend.broker.close_inbox(gateway_id)
    await backend.broker.send_to_gateway(gateway_id, _push(conn=1))
    await backend.broker.send_to_gateway(new_gateway_id(), _push(conn=1))


async def test_publish_room_reaches_only_bound_gateways(backend: Backend) -> None:
    broker = backend.broker
    bound, unbound = await _gateway(backend), await _gateway(backend)
    await broker.bind_room(bound, "lobby")
    await broker.bind_room(unbound, "elsewhere")

    push = _push(room="lobby")
    await broker.publish_room("lobby", push)
    assert await read_n(broker, bound, 1) == [push]
    assert await broker.read_inbox(unbound, 10, NOTHING_S) == []


async def test_unbind_stops_delivery(backend: Backend) -> None:
    broker = backend.broker
    gateway_id = await _gateway(backend)
    await broker.bind_user(gateway_id, "alice")
    await broker.bind_room(gateway_id, "lobby")
    await broker.unbind_user(gateway_id, "alice")
    await broker.unbind_room(gateway_id, "lobby")

    await broker.send_to_user("alice", _push(user="alice"))
    await broker.publish_room("lobby", _push(room="lobby"))
    marker = _push(route="marker", conn=1)
    await broker.send_to_gateway(gateway_id, marker)
    assert await read_n(broker, gateway_id, 1) == [marker]
    assert await broker.read_inbox(gateway_id, 10, NOTHING_S) == []


async def test_a_silent_gateway_loses_bindings_and_members_a_beating_one_keeps_them(
    backend: Backend,
) -> None:
    broker, state, settings = backend.broker, backend.state, backend.settings
    live, silent = await _gateway(backend), await _gateway(backend)
    silent_since = time.monotonic()
    live_member, silent_member = Member(live, 1, "alice"), Member(silent, 2, "alice")
    for gateway_id, member in ((live, live_member), (silent, silent_member)):
        await broker.bind_user(gateway_id, "alice")
        await broker.bind_room(gateway_id, "lobby")
        await state.room_join("lobby", member)
    assert await state.room_members("lobby") == sorted([live_member, silent_member])

    # The live gateway beats on schedule until the silent one's ttl (plus a margin)
    # has surely passed; the silent one's member must vanish within that time.
    members = await state.room_members("lobby")
    give_up = silent_since + settings.presence_ttl_s + 1.0
    while time.monotonic() < give_up:
        await beat(backend, live)
        members = await state.room_members("lobby")
        if members == [live_member] and time.monotonic() > silent_since + settings.presence_ttl_s:
            break
        await asyncio.sleep(settings.heartbeat_s)
    assert members == [live_member]

    # Back after its ttl, the silent gateway starts over: no bindings, no members.
    await broker.open_inbox(silent)
    await beat(backend, silent)
    user_push, room_push = _push(user="alice"), _push(room="lobby")
    await broker.send_to_user("alice", user_push)
    await broker.publish_room("lobby", room_push)
    got = await read_n(broker, live, 2)
    assert sorted(got, key=repr) == sorted([user_push, room_push], key=repr)
    assert await broker.read_inbox(silent, 10, NOTHING_S) == []
    assert await state.room_members("lobby") == [live_member]


# -- state ---------------------------------------------------------------------------


async def test_room_members_join_leave_and_forget(backend: Backend) -> None:
    state = backend.state
    gw1, gw2 = sorted([new_gateway_id(), new_gateway_id()])
    for gateway_id in (gw1, gw2):
        await beat(backend, gateway_id)
    zed, amy, bob = Member(gw2, 1, "zed"), Member(gw1, 5, "amy"), Member(gw1, 2, "bob")
    for member in (zed, amy, bob, amy):
        await state.room_join("lobby", member)
    await state.room_join("kitchen", amy)
    assert await state.room_members("lobby") == [bob, amy, zed]

    await state.room_leave("lobby", bob)
    await state.room_leave("lobby", bob)
    assert await state.room_members("lobby") == [amy, zed]
    assert await state.room_members("empty") == []

    await state.forget_gateway(gw1)
    assert await state.room_members("lobby") == [zed]
    assert await state.room_members("kitchen") == []


async def test_once_holds_a_key_for_its_ttl(backend: Backend) -> None:
    state, ttl_s = backend.state, 0.5
    taken = time.monotonic()
    assert await state.once("charge:42", ttl_s) is True
    assert await state.once("charge:42", ttl_s) is False
    assert await state.once("charge:43", ttl_s) is True

    again = False
    while not again and time.monotonic() < taken + ttl_s + 2.0:
        await asyncio.sleep(0.05)
        again = await state.once("charge:42", ttl_s)
    assert again
    assert time.monotonic() - taken >= ttl_s * 0.9


# -- payloads --------------------------------------------------------------------------

PAYLOADS = [
    json.dumps("olá ☃ 🚀 ü", ensure_ascii=False).encode(),
    json.dumps("ç" * 30 * 1024, ensure_ascii=False).encode(),  # 60 KiB of 2-byte characters
    bytes(range(256)),
]


@pytest.mark.parametrize("data", PAYLOADS, ids=["non-ascii", "60KiB", "all-bytes"])
async def test_raw_data_survives_byte_for_byte(backend: Backend, data: bytes) -> None:
    broker = backend.broker
    await broker.register_routes(["raw"])
    await broker.publish(make_envelope("raw", data))
    [delivery] = await fetch_n(broker, "w1", ["raw"], 1)
    assert delivery.envelope.data == data
    await broker.ack("w1", [delivery])

    gateway_id = await _gateway(backend)
    await broker.bind_user(gateway_id, "alice")
    await broker.bind_room(gateway_id, "lobby")
    await broker.send_to_gateway(gateway_id, Reply(ref="r", conn=1, data=data))
    await broker.send_to_user("alice", _push(data=data, user="alice"))
    await broker.publish_room("lobby", _push(data=data, room="lobby"))
    got = await read_n(broker, gateway_id, 3)
    assert [message.data for message in got] == [data] * 3  # type: ignore[union-attr]
