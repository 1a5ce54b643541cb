"""Property tests: any split of a byte stream gives the same events; garbage never raises."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from portao.wire.events import BadMessage, Frame, FrameEvent
from portao.wire.framing import LengthPrefixCodec, NewlineCodec
from portao.wire.messages import decode_message

MAX = 32
Codec = NewlineCodec | LengthPrefixCodec

line_payloads = st.binary(max_size=MAX + 8).filter(lambda b: b"\n" not in b)
any_payloads = st.binary(max_size=MAX)


def run(codec: Codec, data: bytes, cuts: list[int]) -> list[FrameEvent]:
    """Feed `data` cut at `cuts` (no empty chunk: that is EOF); check the buffer bound."""
    limit = MAX + (1 if isinstance(codec, NewlineCodec) else 4)
    events: list[FrameEvent] = []
    start = 0
    for end in [*sorted(set(cuts) - {0}), len(data)]:
        codec.receive_data(data[start:end])
        assert codec.buffered_bytes <= limit
        events += codec.events_received()
        start = end
    return events


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=len(data))


@settings(deadline=None)
@given(st.lists(line_payloads, max_size=20), st.data())
def test_newline_same_events_whatever_the_split(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(p + b"\n" for p in payloads)
    whole = run(NewlineCodec(MAX), stream, [])
    split = run(NewlineCodec(MAX), stream, data.draw(cuts_for(stream)))
    assert split == whole
    expected = [p[:-1] if p.endswith(b"\r") else p for p in payloads]
    frames = [e.payload for e in whole if isinstance(e, Frame)]
    assert frames == [p for p in expected if p.strip() and len(p) <= MAX]
    assert len(whole) == sum(1 for p in expected if p.strip() or len(p) > MAX)


@settings(deadline=None)
@given(st.lists(any_payloads, max_size=20), st.data())
def test_len_same_events_whatever_the_split(payloads: list[bytes], data: st.DataObject) -> None:
    codec = LengthPrefixCodec(MAX)
    stream = b"".join(codec.send_frame(p) for p in payloads)
    assert run(codec, stream, data.draw(cuts_for(stream))) == [Frame(p) for p in payloads]
    assert codec.buffered_bytes == 0


@settings(deadline=None)
@given(st.binary(max_size=400), st.data())
def test_garbage_never_raises_and_stays_bounded(garbage: bytes, data: st.DataObject) -> None:
    for codec in (NewlineCodec(MAX), LengthPrefixCodec(MAX)):
        events = run(codec, garbage, data.draw(cuts_for(garbage)))
        codec.receive_data(b"")
        assert codec.is_closed
        assert codec.buffered_bytes == 0
        for event in events:
            if isinstance(event, Frame):
                assert len(event.payload) <= MAX


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_garbage_never_raises(payload: bytes) -> None:
    decode_message(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)
ops = st.sampled_from(["auth", "call", "send", "sub", "unsub", "ping", "nope"])
fields = st.dictionaries(
    st.sampled_from(["id", "route", "room", "data", "token", "extra"]), json_values, max_size=5
)


@settings(max_examples=300, deadline=None)
@given(ops, fields)
def test_decode_any_json_object_gives_a_message_or_bad_request(
    op: str, body: dict[str, Any]
) -> None:
    result = decode_message(json.dumps({"op": op, **body}).encode())
    if isinstance(result, BadMessage):
        assert len(result.message) < 200
        assert result.id is None or result.id == body.get("id")
