"""Every op and field rule of the client messages, and the gateway's encoders."""

from __future__ import annotations

import json
from typing import Any

import pytest

from portao.errors import ErrorCode
from portao.wire.events import Auth, BadMessage, Call, ClientMessage, Ping, Send, Sub, Unsub
from portao.wire.messages import (
    decode_message,
    decode_server_message,
    encode_ack,
    encode_bye,
    encode_error,
    encode_ok,
    encode_pong,
    encode_push,
    encode_reply,
)

ROUTE_RULE = "field `route` must match [A-Za-z0-9_.:-]{1,128}"
ROOM_RULE = "field `room` must match [A-Za-z0-9_.:-]{1,128}"
ID_RULE = "field `id` must be an integer or a string of at most 64 characters"


def dec(message: Any) -> ClientMessage | BadMessage:
    return decode_message(json.dumps(message).encode())


def bad_request(message: str, id: int | str | None = None) -> BadMessage:
    return BadMessage(ErrorCode.BAD_REQUEST, message, id)


# -- valid messages ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"op": "auth", "token": "t"}, Auth("t")),
        ({"op": "auth", "token": "t", "id": 1}, Auth("t", 1)),
        (
            {"op": "call", "id": 7, "route": "chat.say", "data": {"a": 1}},
            Call(7, "chat.say", b'{"a": 1}'),
        ),
        ({"op": "call", "id": "x", "route": "r", "data": None}, Call("x", "r", b"null")),
        ({"op": "send", "route": "r:1", "data": [1]}, Send("r:1", b"[1]")),
        ({"op": "send", "route": "r", "data": "s", "id": 2}, Send("r", b'"s"', 2)),
        ({"op": "sub", "room": "lobby"}, Sub("lobby")),
        ({"op": "sub", "room": "a_b-c.d:e", "id": "s"}, Sub("a_b-c.d:e", "s")),
        ({"op": "unsub", "room": "lobby"}, Unsub("lobby")),
        ({"op": "unsub", "room": "lobby", "id": 3}, Unsub("lobby", 3)),
        ({"op": "ping"}, Ping()),
        ({"op": "ping", "id": -1}, Ping(-1)),
        ({"op": "ping", "id": None}, Ping()),
        ({"id": 9, "op": "ping"}, Ping(9)),
    ],
)
def test_valid(message: Any, expected: ClientMessage) -> None:
    assert dec(message) == expected


def test_data_is_carried_raw() -> None:
    payload = b'{"op":"call","id":1,"route":"r","data":{ "b" : [1.50, 2e3],\t"a":"\\u00e9" }}'
    assert decode_message(payload) == Call(1, "r", b'{ "b" : [1.50, 2e3],\t"a":"\\u00e9" }')


def test_utf8_in_data() -> None:
    payload = '{"op":"send","route":"r","data":"olá, portão"}'.encode()
    assert decode_message(payload) == Send("r", '"olá, portão"'.encode())


def test_whitespace_around_object() -> None:
    assert decode_message(b' \t{"op":"ping"}\r\n ') == Ping()


@pytest.mark.parametrize("id", [0, 2**63 - 1, -(2**63), "", "x" * 64, "é" * 64])
def test_id_bounds_valid(id: int | str) -> None:
    assert dec({"op": "ping", "id": id}) == Ping(id)


@pytest.mark.parametrize("name", ["a", "x" * 128, "A-Z_a.z:0-9"])
def test_names_valid(name: str) -> None:
    assert dec({"op": "sub", "room": name}) == Sub(name)
    assert dec({"op": "send", "route": name, "data": 0}) == Send(name, b"0")


# -- field rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    "id", [True, False, 1.5, 1e3, [1], {"a": 1}, "x" * 65, 2**63, -(2**63) - 1]
)
def test_id_invalid(id: Any) -> None:
    assert dec({"op": "ping", "id": id}) == bad_request(ID_RULE)


def test_huge_integer_id() -> None:
    payload = b'{"op":"ping","id":1' + b"0" * 5000 + b"}"
    assert decode_message(payload) == bad_request(ID_RULE)


@pytest.mark.parametrize("name", ["", "x" * 129, "a b", "a/b", "é", "a\n", "*", 1, None, ["a"]])
def test_route_and_room_invalid(name: Any) -> None:
    assert dec({"op": "call", "id": 1, "route": name, "data": 0}) == bad_request(ROUTE_RULE, 1)
    assert dec({"op": "send", "route": name, "data": 0, "id": "s"}) == bad_request(ROUTE_RULE, "s")
    assert dec({"op": "sub", "room": name, "id": 2}) == bad_request(ROOM_RULE, 2)
    assert dec({"op": "unsub", "room": name}) == bad_request(ROOM_RULE)


def test_name_with_trailing_newline_escape() -> None:
    payload = b'{"op":"sub","room":"lobby\\n","id":1}'
    assert decode_message(payload) == bad_request(ROOM_RULE, 1)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"op": "auth"}, "token"),
        ({"op": "call", "route": "r", "data": 1}, "id"),
        ({"op": "call", "id": 1, "data": 1}, "route"),
        ({"op": "call", "id": 1, "route": "r"}, "data"),
        ({"op": "send", "data": 1}, "route"),
        ({"op": "send", "route": "r"}, "data"),
        ({"op": "sub"}, "room"),
        ({"op": "unsub"}, "room"),
        ({"id": 5}, "op"),
    ],
)
def test_required_fields(message: dict[str, Any], field: str) -> None:
    result = dec(message)
    assert isinstance(result, BadMessage)
    assert (result.code, result.message) == (ErrorCode.BAD_REQUEST, f"field `{field}` is required")
    assert result.id == message.get("id")


@pytest.mark.parametrize("op", ["auth", "call", "send", "sub", "unsub", "ping"])
def test_unknown_field(op: str) -> None:
    base = {
        "auth": {"token": "t"},
        "call": {"id": 1, "route": "r", "data": 1},
        "send": {"route": "r", "data": 1},
        "sub": {"room": "r"},
        "unsub": {"room": "r"},
        "ping": {},
    }[op]
    result = dec({"op": op, **base, "id": 4, "extra": 1})
    assert result == bad_request("unknown field `extra`", 4)


def test_unknown_field_name_is_truncated() -> None:
    result = dec({"op": "ping", "z" * 10_000: 1})
    assert isinstance(result, BadMessage)
    assert result.code == ErrorCode.BAD_REQUEST
    assert len(result.message) < 100


@pytest.mark.parametrize("op", ["nope", "", "PING", 7, None, "x" * 10_000])
def test_unknown_op(op: Any) -> None:
    result = dec({"op": op, "id": "i"})
    assert result == bad_request(
        "field `op` must be one of auth, call, send, sub, unsub, ping", "i"
    )


def test_token_must_be_a_string() -> None:
    assert dec({"op": "auth", "token": 5, "id": 1}) == bad_request(
        "field `token` must be a string", 1
    )


def test_call_id_cannot_be_null() -> None:
    assert dec({"op": "call", "id": None, "route": "r", "data": 1}) == bad_request(ID_RULE)


def test_invalid_id_is_not_echoed_with_other_errors() -> None:
    assert dec({"op": "nope", "id": True}) == bad_request(
        "field `op` must be one of auth, call, send, sub, unsub, ping"
    )


# -- bad frames ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"nope", b"{", b'{"op":"ping"} x', b"\xef\xbb\xbf{}", b'{"op":"ping","id":"\xff"}'],
)
def test_not_json(payload: bytes) -> None:
    result = decode_message(payload)
    assert isinstance(result, BadMessage)
    assert result.code == ErrorCode.BAD_FRAME
    assert result.message.startswith("not valid UTF-8 JSON")


@pytest.mark.parametrize("payload", [b"[]", b"1", b'"op"', b"null", b" [{}]", b"true"])
def test_not_an_object(payload: bytes) -> None:
    assert decode_message(payload) == BadMessage(
        ErrorCode.BAD_FRAME, "a message must be a JSON object"
    )


def test_bad_utf8_inside_raw_data() -> None:
    payload = b'{"op":"call","id":1,"route":"r","data":["\xc3\x28"]}'
    assert decode_message(payload) == BadMessage(ErrorCode.BAD_FRAME, "not valid UTF-8 JSON", 1)
    payload = b'{"op":"send","route":"r","data":"\xff"}'
    assert decode_message(payload) == BadMessage(ErrorCode.BAD_FRAME, "not valid UTF-8 JSON")


def test_lone_surrogate_escape_in_data() -> None:
    result = decode_message(b'{"op":"send","route":"r","data":"\\ud800"}')
    assert isinstance(result, BadMessage)
    assert result.code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("depth", [10, 500, 100_000])
def test_deep_nesting_never_raises(depth: int) -> None:
    data = b"[" * depth + b"]" * depth
    result = decode_message(b'{"op":"send","route":"r","id":1,"data":' + data + b"}")
    assert result == Send("r", data, 1) or result == bad_request("JSON nested too deeply", 1)


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("payload", "id"),
    [
        (b'{"op":"call","id":7,"route":"r","data":%s}' % DEEP, 7),
        (b'{ "id" : "a\\"b" , "op":"call","route":"r","data":%s}' % DEEP, 'a"b'),
        # portao.client writes the id last
        (b'{"op":"call","route":"r","data":%s,"id":8}' % DEEP, 8),
        (b'{"op":"call","route":"r","data":%s , "id" : "x" }\n' % DEEP, "x"),
        (b'{"op":"call","route":"r","data":%s}' % DEEP, None),
        # an id after the deep value but not last, or nested, or not an id: none
        (b'{"op":"call","route":"r","data":%s,"id":9,"x":1}' % DEEP, None),
        (b'{"op":"call","route":"r","data":[{"id":5},%s]}' % DEEP, None),
        (b'{"op":"call","data":{"id":5,"a":%s},"route":"r"}' % DEEP, None),
        (b'{"op":"call","route":"r","data":%s,"id":true}' % DEEP, None),
        (b'{"op":"call","route":"r","data":%s,"id":1.5}' % DEEP, None),
        (b'{"op":"call","route":"r","data":%s,"id":"%s"}' % (DEEP, b"i" * 65), None),
    ],
)
def test_deep_nesting_answer_carries_a_shallow_id(payload: bytes, id: int | str | None) -> None:
    assert decode_message(payload) == bad_request("JSON nested too deeply", id)


def test_deep_nesting_in_a_bad_message() -> None:
    result = decode_message(b'{"op":"nope","id":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert isinstance(result, BadMessage)
    assert result.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "data",
    [
        b"1" * 4300,  # the most digits a worker decodes
        b"-1e-99999",
        b"1.7976931348623157e308",
        b"[1e99, 1E+99, 0e999, 0.0e+500]",
        b'"' + b"s" * 60_000 + b'"',
        b'"1e400 in a string"',
        b'{"a":"%s","b":"e400 %s"}' % (b"x" * 300, b"9" * 300),  # only in strings
        b"123456789" * 100,
    ],
)
def test_huge_numbers_and_long_strings_are_valid_data(data: bytes) -> None:
    assert decode_message(b'{"op":"send","route":"r","data":' + data + b"}") == Send("r", data)


OUT_OF_RANGE = (
    "field `data` holds a number a worker cannot decode (past a double's range, like "
    "1e400, or an integer of over 4300 digits); send it as a string"
)


@pytest.mark.parametrize(
    "data",
    [
        b"1e400",
        b"-1e400",
        b"1.8e308",
        b'[1, {"a": 1E+400}]',
        b"1" * 250 + b"e99",  # no 3-digit exponent, yet past 1.8e308
        b'["%s", %se99]' % (b"x" * 300, b"1" * 250),  # the same in large data
        b"1" * 4301,
        b"[" + b"1.5," * 100 + b"-1e400]",  # large data: found by the pre-check
        b'{"a":"%s","n":-1E+0400}' % (b"x" * 300),
        b"[" + b"7" * 400 + b".5]",
    ],
)
def test_number_no_worker_decodes_is_refused(data: bytes) -> None:
    call = b'{"op":"call","id":3,"route":"r","data":' + data + b"}"
    assert decode_message(call) == bad_request(OUT_OF_RANGE, 3)
    send = b'{"op":"send","route":"r","data":' + data + b"}"
    assert decode_message(send) == bad_request(OUT_OF_RANGE)


def test_long_bad_value_is_not_echoed() -> None:
    result = decode_message(b'{"op":"call","id":1,"route":"' + b"x" * 60_000 + b'","data":1}')
    assert result == bad_request(ROUTE_RULE, 1)


# -- encoders --------------------------------------------------------------------------


def test_encoders_byte_exact() -> None:
    assert encode_ok("ana") == b'{"op":"ok","user":"ana"}'
    assert encode_ok("ana", 1) == b'{"op":"ok","user":"ana","id":1}'
    assert encode_reply("c1", b'{"x": [1, 2]}') == b'{"op":"reply","id":"c1","data":{"x": [1, 2]}}'
    assert encode_reply(3, b"null") == b'{"op":"reply","id":3,"data":null}'
    assert encode_ack(4) == b'{"op":"ack","id":4}'
    assert (
        encode_error(ErrorCode.TIMEOUT, "late")
        == b'{"op":"error","code":"timeout","message":"late"}'
    )
    assert (
        encode_error("bad_request", "no", "q")
        == b'{"op":"error","code":"bad_request","message":"no","id":"q"}'
    )
    assert encode_push("news", b"[1]") == b'{"op":"push","route":"news","data":[1]}'
    assert (
        encode_push("chat.msg", b'"hi"', room="lobby")
        == b'{"op":"push","route":"chat.msg","data":"hi","room":"lobby"}'
    )
    assert encode_pong() == b'{"op":"pong"}'
    assert encode_pong(0) == b'{"op":"pong","id":0}'
    assert encode_bye("shutdown", "bye") == b'{"op":"bye","code":"shutdown","message":"bye"}'
    assert (
        encode_bye(ErrorCode.SHUTDOWN, "bye", 500)
        == b'{"op":"bye","code":"shutdown","message":"bye","retry_after_ms":500}'
    )


@pytest.mark.parametrize("text", ["a\nb", "\r\n", "\u2028\u2029", "\x00\x1f", "é\n"])
def test_encoded_payloads_never_contain_a_raw_newline(text: str) -> None:
    encoded = [
        encode_ok(text, text),
        encode_error(text, text, text),
        encode_bye(text, text, 1),
        encode_pong(text),
        encode_ack(text),
        encode_reply(text, json.dumps(text).encode()),
        encode_push(text, json.dumps(text).encode(), text),
    ]
    for payload in encoded:
        assert b"\n" not in payload
        assert isinstance(decode_server_message(payload), dict)


def test_decode_server_message() -> None:
    assert decode_server_message(encode_reply(1, b'{"a": [1]}')) == {
        "op": "reply",
        "id": 1,
        "data": {"a": [1]},
    }
    assert decode_server_message(encode_pong()) == {"op": "pong"}


@pytest.mark.parametrize("payload", [b"[1]", b"nope", b"", b"[" * 100_000])
def test_decode_server_message_bad_frame(payload: bytes) -> None:
    result = decode_server_message(payload)
    assert isinstance(result, BadMessage)
    assert result.code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("payload", [b"{}", b'{"op":1}'])
def test_decode_server_message_without_op(payload: bytes) -> None:
    result = decode_server_message(payload)
    assert isinstance(result, BadMessage)
    assert result.code == ErrorCode.BAD_REQUEST


def test_bad_message_repr_has_no_token() -> None:
    assert "s3cret" not in repr(dec({"op": "auth", "token": "s3cret"}))
