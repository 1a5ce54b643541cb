"""The connection state machine with fake times: every state, every input, exact actions."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portao.errors import ErrorCode
from portao.routing.pending import PendingCall, PendingCalls
from portao.session.actions import (
    Action,
    Authenticated,
    CloseWith,
    JoinRoom,
    LeaveRoom,
    PauseReading,
    Publish,
    SendPayload,
)
from portao.session.auth import TokenVerifier, mint_token
from portao.session.lifecycle import MAX_AUTH_FAILURES, Limits, Session, State
from portao.wire import messages as wire
from portao.wire.events import (
    Auth,
    BadMessage,
    Call,
    ClientMessage,
    Frame,
    FrameError,
    FrameEvent,
    Ping,
    Send,
    Sub,
    Unsub,
)

NOW = 1_800_000_000.0
SECRET = "s" * 32
CONN = 7
GATEWAY = "gw-test"
VERIFIER = TokenVerifier("HS256", SECRET)
#: Big enough that only the rate-limit tests ever meet the bucket.
LIMITS = Limits(rate_limit_per_s=1e6, rate_burst=1_000_000)


def _token(
    sub: str = "alice",
    *,
    rooms: list[str] | None = None,
    ttl_s: float | None = 3600,
    now: float = NOW,
    key: str = SECRET,
) -> str:
    return mint_token(key, sub, rooms=rooms, ttl_s=ttl_s, now=now)


class _Text(str):
    """Equal to any non-empty string: error texts are for people, not for asserts."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    def __repr__(self) -> str:
        return "<text>"

    __hash__ = str.__hash__


TEXT = _Text("<text>")


def _error(code: ErrorCode, id: Any = None) -> dict[str, Any]:
    out = {"op": "error", "code": code.value, "message": TEXT}
    if id is not None:
        out["id"] = id
    return out


def _decoded(actions: list[Action]) -> list[Any]:
    """Actions with each `SendPayload` turned into the JSON object it carries."""
    return [json.loads(a.payload) if isinstance(a, SendPayload) else a for a in actions]


def _frame(obj: dict[str, Any]) -> Frame:
    return Frame(json.dumps(obj).encode())


def _new(limits: Limits = LIMITS, pending: PendingCalls | None = None, now: float = NOW) -> Session:
    pending = pending if pending is not None else PendingCalls()
    return Session(CONN, GATEWAY, limits, VERIFIER, pending, now)


def _feed(session: Session, obj: dict[str, Any], now: float = NOW) -> list[Any]:
    return _decoded(session.receive_event(_frame(obj), now))


def _opened(
    limits: Limits = LIMITS,
    pending: PendingCalls | None = None,
    *,
    rooms: list[str] | None = None,
    ttl_s: float | None = 3600,
) -> Session:
    session = _new(limits, pending)
    token = _token(rooms=rooms, ttl_s=ttl_s)
    assert _feed(session, {"op": "auth", "token": token}) == [Authenticated("alice", None)]
    return session


def _in_state(state: State) -> Session:
    session = _new() if state is State.AWAITING_AUTH else _opened()
    if state is State.DRAINING:
        session.start_draining(1000)
    elif state is State.CLOSED:
        session.mark_closed()
    assert session.state is state
    return session


REQUESTS: list[dict[str, Any]] = [
    {"op": "call", "id": 1, "route": "echo", "data": 1},
    {"op": "send", "id": "s", "route": "echo", "data": None},
    {"op": "sub", "id": 3, "room": "lobby"},
    {"op": "unsub", "id": 4, "room": "lobby"},
]


# -- ping and auth ---------------------------------------------------------------


@pytest.mark.parametrize("state", [State.AWAITING_AUTH, State.OPEN, State.DRAINING])
def test_ping_is_answered_in_every_live_state(state: State) -> None:
    session = _in_state(state)
    assert _feed(session, {"op": "ping", "id": "p"}) == [{"op": "pong", "id": "p"}]
    assert _feed(session, {"op": "ping"}) == [{"op": "pong"}]
    assert session.state is state


def test_ping_is_ignored_when_closed() -> None:
    session = _in_state(State.CLOSED)
    assert _feed(session, {"op": "ping", "id": 1}) == []
    assert session.receive_message(Ping(1), NOW) == []


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r["op"])
def test_every_op_before_auth_is_unauthorized_with_its_id(request_: dict[str, Any]) -> None:
    pending = PendingCalls()
    session = _new(pending=pending)
    assert _feed(session, request_) == [_error(ErrorCode.UNAUTHORIZED, request_["id"])]
    without_id = {k: v for k, v in request_.items() if k != "id"}
    if request_["op"] != "call":  # a call needs its id
        assert _feed(session, without_id) == [_error(ErrorCode.UNAUTHORIZED)]
    assert session.state is State.AWAITING_AUTH
    assert len(pending) == 0


def test_auth_opens_the_session() -> None:
    session = _new()
    assert _feed(session, {"op": "auth", "token": _token(), "id": 1}) == [Authenticated("alice", 1)]
    assert session.state is State.OPEN
    assert session.is_open
    assert session.user == "alice"


def test_refresh_with_the_same_sub_extends_the_expiry() -> None:
    session = _opened(ttl_s=60, rooms=[])
    assert session.next_deadline() == NOW + 60
    fresh = _token(ttl_s=3600, now=NOW + 30, rooms=["lobby"])
    assert _feed(session, {"op": "auth", "token": fresh, "id": 2}, NOW + 30) == [
        {"op": "ok", "user": "alice", "id": 2}
    ]
    assert session.state is State.OPEN
    assert session.next_deadline() == NOW + 30 + 3600
    assert session.on_deadline(NOW + 60) == []  # the first token's expiry
    # the new token's rooms count too
    assert _feed(session, {"op": "sub", "room": "lobby", "id": 3}, NOW + 61) == [
        JoinRoom("lobby", 3)
    ]
    assert session.on_deadline(NOW + 3630) == [CloseWith(ErrorCode.UNAUTHORIZED, TEXT)]
    assert not session.is_open


def test_refresh_with_another_sub_is_forbidden() -> None:
    session = _opened(ttl_s=60)
    bob = _token("bob", ttl_s=3600)
    assert _feed(session, {"op": "auth", "token": bob, "id": 2}) == [_error(ErrorCode.FORBIDDEN, 2)]
    assert session.user == "alice"
    assert session.next_deadline() == NOW + 60  # bob's expiry was not taken


def test_three_failed_auths_end_the_connection() -> None:
    session = _new()
    bad = [
        _token(key="another-secret-" + "y" * 32),  # forged
        _token(ttl_s=-10),  # expired
        "garbage",
    ]
    for attempt, token in enumerate(bad[: MAX_AUTH_FAILURES - 1]):
        assert _feed(session, {"op": "auth", "token": token, "id": attempt}) == [
            _error(ErrorCode.UNAUTHORIZED, attempt)
        ]
        assert session.state is State.AWAITING_AUTH
    assert _feed(session, {"op": "auth", "token": bad[-1], "id": 9}) == [
        CloseWith(ErrorCode.UNAUTHORIZED, TEXT)
    ]
    assert session.state is State.CLOSED
    assert _feed(session, {"op": "auth", "token": _token()}) == []


# -- deadlines -------------------------------------------------------------------


def test_auth_deadline() -> None:
    session = _new(Limits(auth_timeout_s=10))
    assert session.next_deadline() == NOW + 10
    assert session.on_deadline(NOW + 9.999) == []
    assert session.on_deadline(NOW + 10) == [CloseWith(ErrorCode.UNAUTHORIZED, TEXT)]
    assert session.state is State.CLOSED
    assert session.next_deadline() is None


def test_auth_deadline_is_gone_once_authenticated() -> None:
    session = _opened(Limits(auth_timeout_s=10), ttl_s=None)
    assert session.next_deadline() is None
    assert session.on_deadline(NOW + 86400) == []
    assert session.state is State.OPEN


def test_token_expiry_closes() -> None:
    session = _opened(ttl_s=60)
    assert session.next_deadline() == NOW + 60
    assert session.on_deadline(NOW + 59.5) == []
    assert session.on_deadline(NOW + 60) == [CloseWith(ErrorCode.UNAUTHORIZED, TEXT)]
    assert session.state is State.CLOSED


def test_idle_timeout_counts_every_frame() -> None:
    session = _new(Limits(auth_timeout_s=100, idle_timeout_s=5))
    assert session.next_deadline() == NOW + 5
    _feed(session, {"op": "auth", "token": _token(ttl_s=None)}, NOW + 4)
    assert session.next_deadline() == NOW + 9
    # a framing error is a frame from the client too
    session.receive_event(FrameError(ErrorCode.TOO_LARGE, "big", fatal=False), NOW + 8)
    assert session.next_deadline() == NOW + 13
    assert session.on_deadline(NOW + 12.9) == []
    assert session.on_deadline(NOW + 13) == [CloseWith(ErrorCode.IDLE_TIMEOUT, TEXT)]
    assert session.state is State.CLOSED


def test_idle_timeout_also_before_auth() -> None:
    session = _new(Limits(auth_timeout_s=100, idle_timeout_s=5))
    assert session.on_deadline(NOW + 5) == [CloseWith(ErrorCode.IDLE_TIMEOUT, TEXT)]


def test_idle_timeout_off_by_default() -> None:
    session = _opened(ttl_s=None)
    assert session.next_deadline() is None
    assert session.on_deadline(NOW + 10**6) == []
    assert session.state is State.OPEN


def test_the_earliest_deadline_wins() -> None:
    session = _opened(Limits(idle_timeout_s=120), ttl_s=60)
    assert session.next_deadline() == NOW + 60
    session = _opened(Limits(idle_timeout_s=30), ttl_s=60)
    assert session.next_deadline() == NOW + 30


# -- requests --------------------------------------------------------------------


def test_call_publishes_an_envelope_and_tracks_it() -> None:
    pending = PendingCalls()
    session = _opened(Limits(call_timeout_s=30), pending)
    data = b'{"z":1,  "a":[1.50,"\\u00e9"]}'
    frame = Frame(b'{"op":"call","id":5,"route":"shop.cart","data":' + data + b"}")
    [publish] = session.receive_event(frame, NOW + 1)
    assert isinstance(publish, Publish)
    assert publish.client_id == 5
    envelope = publish.envelope
    assert (envelope.kind, envelope.route, envelope.user) == ("call", "shop.cart", "alice")
    assert (envelope.gateway, envelope.conn, envelope.attempt) == (GATEWAY, CONN, 1)
    assert envelope.deadline == NOW + 1 + 30
    assert envelope.data == data
    assert pending.count(CONN) == 1
    assert pending.next_deadline() == NOW + 31
    assert pending.pop(envelope.id, CONN) == PendingCall(envelope.id, CONN, 5, NOW + 31)


def test_every_call_gets_its_own_message_id() -> None:
    session = _opened()
    ids = set()
    for i in range(20):
        call = _frame({"op": "call", "id": i, "route": "r", "data": i})
        [publish] = session.receive_event(call, NOW)
        assert isinstance(publish, Publish)
        ids.add(publish.envelope.id)
    assert len(ids) == 20


def test_duplicate_pending_id_is_answered_without_id() -> None:
    pending = PendingCalls()
    session = _opened(pending=pending)
    call = {"op": "call", "id": "x", "route": "echo", "data": 1}
    [first] = session.receive_event(_frame(call), NOW)
    assert isinstance(first, Publish)
    assert _feed(session, call) == [_error(ErrorCode.BAD_REQUEST)]
    assert pending.count(CONN) == 1
    # once answered, the id is free again
    assert pending.pop(first.envelope.id, CONN) is not None
    [again] = session.receive_event(_frame(call), NOW)
    assert isinstance(again, Publish)
    assert again.client_id == "x"


def test_pending_call_cap_is_overloaded() -> None:
    pending = PendingCalls()
    session = _opened(Limits(max_pending_calls=2), pending)
    for i in range(2):
        call = _frame({"op": "call", "id": i, "route": "r", "data": 0})
        [publish] = session.receive_event(call, NOW)
        assert isinstance(publish, Publish)
    assert _feed(session, {"op": "call", "id": 2, "route": "r", "data": 0}) == [
        _error(ErrorCode.OVERLOADED, 2)
    ]
    assert pending.count(CONN) == 2
    # sends are not calls: they still go through
    [send] = session.receive_event(_frame({"op": "send", "route": "r", "data": 0}), NOW)
    assert isinstance(send, Publish)


@pytest.mark.parametrize("id", [None, 0, "s-1"])
def test_send_publishes_without_tracking(id: Any) -> None:
    pending = PendingCalls()
    session = _opened(pending=pending)
    message = {"op": "send", "route": "log.line", "data": [1, 2]}
    if id is not None:
        message["id"] = id
    [publish] = session.receive_event(_frame(message), NOW)
    assert isinstance(publish, Publish)
    assert publish.client_id == id
    envelope = publish.envelope
    assert (envelope.kind, envelope.route, envelope.user, envelope.deadline) == (
        "send",
        "log.line",
        "alice",
        None,
    )
    assert envelope.data == b"[1, 2]"
    assert len(pending) == 0


def test_sub_is_gated_by_the_rooms_claim() -> None:
    session = _opened(rooms=["team:*:chat", "lobby"])
    assert _feed(session, {"op": "sub", "room": "lobby", "id": 1}) == [JoinRoom("lobby", 1)]
    assert _feed(session, {"op": "sub", "room": "team:a.b:chat"}) == [
        JoinRoom("team:a.b:chat", None)
    ]
    # `*` matches an empty run too
    assert _feed(session, {"op": "sub", "room": "team::chat", "id": 2}) == [
        JoinRoom("team::chat", 2)
    ]
    for i, room in enumerate(["team:a:chatter", "lobby2", "Lobby"]):
        assert _feed(session, {"op": "sub", "room": room, "id": 10 + i}) == [
            _error(ErrorCode.FORBIDDEN, 10 + i)
        ]


def test_no_rooms_claim_allows_no_sub() -> None:
    session = _opened(rooms=None)
    assert _feed(session, {"op": "sub", "room": "lobby", "id": 1}) == [
        _error(ErrorCode.FORBIDDEN, 1)
    ]


def test_star_allows_every_room() -> None:
    session = _opened(rooms=["*"])
    assert _feed(session, {"op": "sub", "room": "a.b:c", "id": 1}) == [JoinRoom("a.b:c", 1)]


def test_unsub_is_never_gated() -> None:
    session = _opened(rooms=None)
    assert _feed(session, {"op": "unsub", "room": "lobby", "id": 2}) == [LeaveRoom("lobby", 2)]
    assert _feed(session, {"op": "unsub", "room": "lobby"}) == [LeaveRoom("lobby", None)]


def test_bad_messages_are_answered_and_the_session_stays() -> None:
    session = _opened()
    assert _decoded(session.receive_event(Frame(b"not json"), NOW)) == [_error(ErrorCode.BAD_FRAME)]
    assert _feed(session, {"op": "call", "id": 4, "route": "bad name", "data": 1}) == [
        _error(ErrorCode.BAD_REQUEST, 4)
    ]
    assert _decoded(
        session.receive_message(BadMessage(ErrorCode.BAD_REQUEST, "nope", "q"), NOW)
    ) == [_error(ErrorCode.BAD_REQUEST, "q")]
    assert session.state is State.OPEN


# -- framing errors --------------------------------------------------------------


@pytest.mark.parametrize("state", [State.AWAITING_AUTH, State.OPEN, State.DRAINING])
def test_fatal_frame_error_closes(state: State) -> None:
    session = _in_state(state)
    event = FrameError(ErrorCode.TOO_LARGE, "frame over 64 bytes", fatal=True)
    assert session.receive_event(event, NOW) == [
        CloseWith(ErrorCode.TOO_LARGE, "frame over 64 bytes")
    ]
    assert session.state is State.CLOSED


@pytest.mark.parametrize("state", [State.AWAITING_AUTH, State.OPEN, State.DRAINING])
def test_non_fatal_frame_error_is_an_error(state: State) -> None:
    session = _in_state(state)
    event = FrameError(ErrorCode.TOO_LARGE, "frame over 64 bytes", fatal=False)
    assert _decoded(session.receive_event(event, NOW)) == [
        {"op": "error", "code": "too_large", "message": "frame over 64 bytes"}
    ]
    assert session.state is state


# -- draining and closed ---------------------------------------------------------


@pytest.mark.parametrize("authed", [True, False], ids=["open", "awaiting_auth"])
def test_draining(authed: bool) -> None:
    pending = PendingCalls()
    session = _opened(pending=pending, rooms=["*"]) if authed else _new(pending=pending)
    assert _decoded(session.start_draining(2500)) == [
        {"op": "bye", "code": "shutdown", "message": TEXT, "retry_after_ms": 2500}
    ]
    assert session.state is State.DRAINING
    for request in [*REQUESTS, {"op": "auth", "token": _token(), "id": 9}]:
        assert _feed(session, request) == [_error(ErrorCode.SHUTDOWN, request["id"])]
    assert _feed(session, {"op": "ping", "id": 5}) == [{"op": "pong", "id": 5}]
    assert len(pending) == 0
    assert session.start_draining(2500) == []  # one bye only
    # the gateway's drain deadline bounds this state, not the session's timers
    assert session.next_deadline() is None
    assert session.on_deadline(NOW + 10**6) == []
    assert session.state is State.DRAINING


CLOSED_INPUTS: list[ClientMessage | BadMessage] = [
    Auth(_token(), 1),
    Call(2, "echo", b"1"),
    Send("echo", b"1", 3),
    Sub("lobby", 4),
    Unsub("lobby", 5),
    Ping(6),
    BadMessage(ErrorCode.BAD_REQUEST, "nope", 7),
]


@pytest.mark.parametrize("closed_by", ["transport", "bye"])
def test_closed_ignores_everything(closed_by: str) -> None:
    pending = PendingCalls()
    session = _opened(Limits(auth_timeout_s=1, idle_timeout_s=1), pending, rooms=["*"])
    if closed_by == "transport":
        session.mark_closed()
    else:
        session.receive_event(FrameError(ErrorCode.BAD_FRAME, "x", fatal=True), NOW)
    assert session.state is State.CLOSED
    later = NOW + 1
    for message in CLOSED_INPUTS:
        assert session.receive_message(message, later) == []
    events: list[FrameEvent] = [
        *(_frame(r) for r in [*REQUESTS, {"op": "ping"}, {"op": "auth", "token": _token()}]),
        FrameError(ErrorCode.BAD_FRAME, "x", fatal=True),
        FrameError(ErrorCode.TOO_LARGE, "x", fatal=False),
    ]
    for event in events:
        assert session.receive_event(event, later) == []
    assert session.on_deadline(NOW + 10**7) == []
    assert session.start_draining(1000) == []
    assert session.state is State.CLOSED
    assert session.next_deadline() is None
    assert len(pending) == 0


# -- rate limit ------------------------------------------------------------------

# 4 tokens a second, 4 at most: every time below is exact in binary floating point.
RATE = Limits(rate_limit_per_s=4, rate_burst=4)


def test_rate_limit_answers_once_then_holds() -> None:
    session = _new(RATE)
    T = NOW
    assert _feed(session, {"op": "auth", "token": _token()}, T) == [Authenticated("alice", None)]
    for i in (1, 2, 3):
        assert _feed(session, {"op": "ping", "id": i}, T) == [{"op": "pong", "id": i}]
    # the first message over the bucket: answered, consumed, reading pauses
    assert _feed(session, {"op": "ping", "id": 4}, T) == [
        _error(ErrorCode.RATE_LIMITED, 4),
        PauseReading(T + 0.25, hold=False),
    ]
    # too early: held (fed again after the pause), no error
    assert _feed(session, {"op": "ping", "id": 5}, T + 0.1) == [PauseReading(T + 0.25, hold=True)]
    assert _feed(session, {"op": "ping", "id": 5}, T + 0.25) == [{"op": "pong", "id": 5}]
    assert _feed(session, {"op": "ping", "id": 6}, T + 0.25) == [PauseReading(T + 0.5, hold=True)]
    assert _feed(session, {"op": "ping", "id": 6}, T + 0.5) == [{"op": "pong", "id": 6}]
    # partly refilled (full at T + 1.5): still no error, only holds
    for i in (7, 8, 9):
        assert _feed(session, {"op": "ping", "id": i}, T + 1.25) == [{"op": "pong", "id": i}]
    assert _feed(session, {"op": "ping", "id": 10}, T + 1.25) == [PauseReading(T + 1.5, hold=True)]


def test_rate_limit_answers_again_after_a_full_refill() -> None:
    session = _new(RATE)
    T = NOW
    _feed(session, {"op": "auth", "token": _token()}, T)
    for i in range(3):
        _feed(session, {"op": "ping", "id": i}, T)
    assert _feed(session, {"op": "ping", "id": "a"}, T)[0] == _error(ErrorCode.RATE_LIMITED, "a")
    # the client stayed under the rate until the bucket was full again
    later = T + 60
    for i in range(4):
        assert _feed(session, {"op": "ping", "id": i}, later) == [{"op": "pong", "id": i}]
    assert _feed(session, {"op": "ping", "id": "b"}, later) == [
        _error(ErrorCode.RATE_LIMITED, "b"),
        PauseReading(later + 0.25, hold=False),
    ]


def test_a_rate_limited_call_is_not_published() -> None:
    pending = PendingCalls()
    session = _new(Limits(rate_limit_per_s=1, rate_burst=1), pending)
    _feed(session, {"op": "auth", "token": _token()}, NOW)
    assert _feed(session, {"op": "call", "id": 1, "route": "r", "data": 0}, NOW) == [
        _error(ErrorCode.RATE_LIMITED, 1),
        PauseReading(NOW + 1),
    ]
    assert len(pending) == 0


# -- every (state, input) pair ---------------------------------------------------

SETUPS = [
    "awaiting_auth",
    "open",
    "open_short_token",
    "draining",
    "draining_before_auth",
    "closed_by_bye",
    "closed_by_transport",
]
PROPERTY_LIMITS = Limits(
    auth_timeout_s=10,
    call_timeout_s=30,
    max_pending_calls=2,
    rate_limit_per_s=5,
    rate_burst=3,
)
TOKENS = {
    "alice": _token(rooms=["room.*"]),
    "alice_short": _token(ttl_s=20),
    "alice_no_exp": _token(ttl_s=None, rooms=["*"]),
    "bob": _token("bob"),
    "expired": _token(ttl_s=-10),
    "forged": _token(key="another-secret-" + "y" * 32),
    "garbage": "garbage",
}
_ALLOWED: dict[State, set[State]] = {
    State.AWAITING_AUTH: set(State),
    State.OPEN: {State.OPEN, State.DRAINING, State.CLOSED},
    State.DRAINING: {State.DRAINING, State.CLOSED},
    State.CLOSED: {State.CLOSED},
}


def _set_up(name: str, idle_timeout_s: float, pending: PendingCalls) -> Session:
    session = _new(replace(PROPERTY_LIMITS, idle_timeout_s=idle_timeout_s), pending)
    if name not in ("awaiting_auth", "draining_before_auth"):
        token = TOKENS["alice_short" if name == "open_short_token" else "alice"]
        session.receive_event(_frame({"op": "auth", "token": token}), NOW)
    if name.startswith("draining"):
        session.start_draining(1000)
    if name == "closed_by_bye":
        session.receive_event(FrameError(ErrorCode.TOO_LARGE, "x", fatal=True), NOW)
    if name == "closed_by_transport":
        session.mark_closed()
    return session


@dataclass(frozen=True)
class Step:
    """One input: `kind` says which entry point, `dt` how far the clock moves first."""

    kind: str
    dt: float
    payload: bytes = b""
    message: ClientMessage | BadMessage | None = None
    fatal: bool = False


ids = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "x" * 64]))
optional_ids = st.one_of(st.none(), ids)
names = st.sampled_from(["echo", "room.a", "room.", "lobby", "a:b.c"])
bad_names = st.sampled_from(["", "bad name", "x" * 129, "é"])
tokens = st.sampled_from(sorted(TOKENS.values()))
datas = st.sampled_from([None, 0, "x", [1, {"a": None}], {"k": "é"}])


def _with_id(obj: dict[str, Any], id: Any) -> dict[str, Any]:
    return obj if id is None else {**obj, "id": id}


valid_requests = st.one_of(
    st.builds(lambda t, i: _with_id({"op": "auth", "token": t}, i), tokens, optional_ids),
    st.builds(lambda r, d, i: {"op": "call", "id": i, "route": r, "data": d}, names, datas, ids),
    st.builds(
        lambda r, d, i: _with_id({"op": "send", "route": r, "data": d}, i),
        names,
        datas,
        optional_ids,
    ),
    st.builds(
        lambda op, r, i: _with_id({"op": op, "room": r}, i),
        st.sampled_from(["sub", "unsub"]),
        names,
        optional_ids,
    ),
    st.builds(lambda i: _with_id({"op": "ping"}, i), optional_ids),
)
invalid_requests = st.one_of(
    st.builds(lambda r, i: {"op": "call", "id": i, "route": r, "data": 1}, bad_names, ids),
    st.builds(lambda i: {"op": "call", "id": i, "route": "echo"}, ids),  # no data
    st.builds(lambda i: {"op": "send", "data": 1, "id": i}, ids),  # no route
    st.builds(lambda r, i: {"op": "sub", "room": r, "id": i}, bad_names, ids),
    st.builds(lambda i: {"op": "ping", "id": i, "extra": 1}, ids),
    st.builds(lambda i: {"op": "nope", "id": i}, ids),
    st.builds(lambda i: {"op": "auth", "id": i}, ids),  # no token
    st.builds(lambda: {"op": "call", "id": True, "route": "echo", "data": 1}),
)
payloads = st.one_of(
    st.builds(lambda o: json.dumps(o).encode(), st.one_of(valid_requests, invalid_requests)),
    st.sampled_from([b"not json", b"\xff\xfe{}", b"[1]", b"42", b"{}"]),
)
messages = st.one_of(
    st.builds(Auth, tokens, optional_ids),
    st.builds(Call, ids, names, st.just(b"1")),
    st.builds(Send, names, st.just(b"null"), optional_ids),
    st.builds(Sub, names, optional_ids),
    st.builds(Unsub, names, optional_ids),
    st.builds(Ping, optional_ids),
    st.builds(
        BadMessage,
        st.sampled_from([ErrorCode.BAD_REQUEST, ErrorCode.BAD_FRAME]),
        st.just("bad"),
        optional_ids,
    ),
)
dts = st.one_of(st.sampled_from([0.0, 0.0, 0.1, 0.2, 5.0, 10.0, 20.0, 3600.0]), st.floats(0, 4000))
steps = st.one_of(
    st.builds(Step, st.just("frame"), dts, payload=payloads),
    st.builds(Step, st.just("message"), dts, message=messages),
    st.builds(Step, st.just("frame_error"), dts, fatal=st.booleans()),
    st.builds(Step, st.just("deadline"), dts),
    st.builds(Step, st.just("drain"), dts),
    st.builds(Step, st.just("answer_calls"), dts),
)


class Checker:
    """Feeds steps to one session and checks the invariants after each."""

    def __init__(self, session: Session, pending: PendingCalls, now: float) -> None:
        self.session = session
        self.pending = pending
        self.now = now
        self.closes = 0

    def run(self, step: Step) -> None:
        session, pending = self.session, self.pending
        self.now += step.dt
        now = self.now
        before = session.state
        request_id: Any = None
        duplicate = False
        match step.kind:
            case "frame":
                decoded = wire.decode_message(step.payload)
                request_id = decoded.id
                duplicate = isinstance(decoded, Call) and pending.has_client_id(CONN, decoded.id)
                actions = session.receive_event(Frame(step.payload), now)
            case "message":
                assert step.message is not None
                request_id = step.message.id
                duplicate = isinstance(step.message, Call) and pending.has_client_id(
                    CONN, step.message.id
                )
                actions = session.receive_message(step.message, now)
            case "frame_error":
                event = FrameError(ErrorCode.TOO_LARGE, "frame too large", step.fatal)
                actions = session.receive_event(event, now)
            case "deadline":
                due = session.next_deadline()
                actions = session.on_deadline(now)
                if due is None or now < due:
                    assert actions == []
                else:
                    assert [type(a) for a in actions] == [CloseWith]
            case "drain":
                actions = session.start_draining(1000)
            case "answer_calls":
                pending.expire(math.inf)
                actions = []
            case _:  # pragma: no cover
                raise AssertionError(step.kind)
        self.check(step, before, actions, request_id, duplicate, now)

    def check(
        self,
        step: Step,
        before: State,
        actions: list[Action],
        request_id: Any,
        duplicate: bool,
        now: float,
    ) -> None:
        after = self.session.state
        assert after in _ALLOWED[before], (before, after)
        if before is State.CLOSED:
            assert actions == []
            return
        closes = [a for a in actions if isinstance(a, CloseWith)]
        self.closes += len(closes)
        assert self.closes <= 1
        if closes:
            assert actions[-1] is closes[0]
            assert after is State.CLOSED
        for action in actions:
            match action:
                case Publish(envelope=envelope, client_id=client_id):
                    assert before is State.OPEN
                    assert after is State.OPEN
                    assert client_id == request_id
                    assert envelope.user == self.session.user
                    assert (envelope.gateway, envelope.conn) == (GATEWAY, CONN)
                    if envelope.kind == "call":
                        assert envelope.deadline == now + PROPERTY_LIMITS.call_timeout_s
                        assert client_id is not None
                        assert self.pending.has_client_id(CONN, client_id)
                    else:
                        assert envelope.deadline is None
                case (
                    Authenticated(client_id=client_id)
                    | JoinRoom(client_id=client_id)
                    | LeaveRoom(client_id=client_id)
                ):
                    assert after is State.OPEN
                    assert client_id == request_id
                case PauseReading(until=until, hold=hold):
                    assert until >= now
                    if hold:
                        assert actions == [action]
                case SendPayload(payload=payload):
                    answer = json.loads(payload)
                    assert isinstance(answer, dict)
                    if answer["op"] == "bye":
                        assert step.kind == "drain"
                        assert answer["code"] == "shutdown"
                        continue
                    assert answer["op"] in ("error", "pong", "ok")
                    if duplicate and answer.get("code") == "bad_request":
                        assert "id" not in answer
                    else:
                        assert answer.get("id") == request_id
        assert self.pending.count(CONN) <= PROPERTY_LIMITS.max_pending_calls


@pytest.mark.parametrize("setup", SETUPS)
@settings(max_examples=60, deadline=None)
@given(idle=st.sampled_from([0.0, 5.0]), step=steps, then=st.lists(steps, max_size=12))
def test_every_state_and_input(setup: str, idle: float, step: Step, then: list[Step]) -> None:
    """Drive a session into a state, feed it any input, then keep going."""
    pending = PendingCalls()
    session = _set_up(setup, idle, pending)
    checker = Checker(session, pending, NOW)
    checker.closes = 1 if setup == "closed_by_bye" else 0
    for one in [step, *then]:
        checker.run(one)
