"""Fuzz the wire: stream codecs, the WebSocket codec and message decoding, end to end.

tests/wire/test_properties.py holds each codec to its contract on well-formed
streams and plain garbage. Here the bytes are built to reach deeper: JSON-ish
fragments, length headers near the limit, WebSocket frames with any header bits,
cut at any points, fed the way a connection feeds them (codec, then every frame
through `decode_message`). Whatever arrives:

- nothing raises; the only outcomes are frames and the documented errors
  (`too_large`, `bad_frame`, `bad_request`), fatal only where DESIGN.md §1 says so,
  and nothing follows a fatal one;
- a stream codec never holds more than one partial frame (limit + its framing);
- a frame is at most the limit, and on WebSocket valid UTF-8;
- a decoded message is well-formed: names match the pattern, ids are in range,
  `data` is UTF-8 JSON that a worker can decode (numbers past a double excepted:
  those fail in the worker, answered `handler_error`), error texts are short.

In CI each target runs a few hundred examples. Outside CI, a long run:
`python -m tests.chaos.test_fuzz SECONDS` (atheris, `pip install atheris` into the
venv; it is not a project dependency), with crashes kept as regression examples below.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import struct
import sys
from collections.abc import Iterable

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

from portao.errors import ErrorCode
from portao.names import NAME_PATTERN
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
from portao.wire.framing import LengthPrefixCodec, NewlineCodec
from portao.wire.messages import MAX_ID_CHARS, decode_message
from portao.wire.websocket import WebSocketCodec

LIMIT = 64
#: Each stream codec, and what a partial frame may add to the limit in its buffer.
CODECS: dict[str, tuple[type[NewlineCodec | LengthPrefixCodec], int]] = {
    "tcp": (NewlineCodec, 1),
    "tcp+len": (LengthPrefixCodec, 4),
}
EXAMPLES = int(os.environ.get("PORTAO_FUZZ_EXAMPLES", "300"))
_NAME = re.compile(rf"(?:{NAME_PATTERN.pattern})\Z")

# -- the checks (shared by hypothesis and atheris) ---------------------------------------------


def check_decoded(result: ClientMessage | BadMessage) -> None:
    """`decode_message`'s answer is one of the documented shapes."""
    match result:
        case BadMessage(code=code, message=message, id=id):
            assert code in (ErrorCode.BAD_FRAME, ErrorCode.BAD_REQUEST), result
            assert 0 < len(message) <= 200, result
            check_id(id)
        case Call(id=id, route=route, data=data) | Send(route=route, data=data, id=id):
            assert _NAME.match(route), route
            check_id(id)
            check_data(data)
        case Sub(room=room, id=id) | Unsub(room=room, id=id):
            assert _NAME.match(room), room
            check_id(id)
        case Auth(token=token, id=id):
            assert isinstance(token, str)
            check_id(id)
        case Ping(id=id):
            check_id(id)
        case _:
            raise AssertionError(f"unexpected result {result!r}")


def check_id(id: object) -> None:
    if isinstance(id, str):
        assert len(id) <= MAX_ID_CHARS, id
    elif id is not None:
        assert isinstance(id, int), id
        assert -(2**63) <= id < 2**63, id


def check_data(data: bytes) -> None:
    """`data` as the worker will get it: UTF-8 JSON it can decode."""
    assert data
    data.decode()
    try:
        msgspec.json.decode(data)
    except RecursionError:
        return  # nested to the very depth both sides allow: handler_error
    except msgspec.ValidationError as exc:
        error = str(exc)
    else:
        return
    assert "out of range" in error, error  # a number no double holds: handler_error


def check_events(events: Iterable[FrameEvent], fatal_codes: set[ErrorCode]) -> None:
    """Frames within the limit and decodable; errors documented; nothing after a fatal one."""
    ended = False
    for event in events:
        assert not ended, f"{event!r} after a fatal error"
        if isinstance(event, Frame):
            assert len(event.payload) <= LIMIT
            check_decoded(decode_message(event.payload))
        else:
            assert isinstance(event, FrameError), event
            if event.fatal:
                assert event.code in fatal_codes, event
                ended = True
            else:
                assert event.code is ErrorCode.TOO_LARGE, event


def feed_stream(scheme: str, chunks: Iterable[bytes]) -> None:
    """Feed a `tcp`/`tcp+len` codec chunk by chunk, then EOF; check everything on the way."""
    codec_class, framing_bytes = CODECS[scheme]
    codec = codec_class(LIMIT)
    bound = LIMIT + framing_bytes
    events: list[FrameEvent] = []
    for chunk in chunks:
        codec.receive_data(chunk)
        assert codec.buffered_bytes <= bound
        events += codec.events_received()
    codec.receive_data(b"")
    assert codec.is_closed
    assert codec.buffered_bytes == 0
    assert codec.events_received() == []
    fatal = {ErrorCode.TOO_LARGE} if scheme == "tcp+len" else set()
    check_events(events, fatal)


def handshake() -> bytes:
    """A browser's opening handshake for ws://gw.test/."""
    client = ClientProtocol(parse_uri("ws://gw.test/"))
    client.send_request(client.connect())
    return b"".join(client.data_to_send())


_HANDSHAKE = handshake()
_WS_FATAL = {ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE, ErrorCode.BAD_REQUEST}


def feed_websocket(chunks: Iterable[bytes], opened: bool) -> None:
    """Feed the WebSocket codec (after a valid handshake when `opened`), then EOF."""
    codec = WebSocketCodec(LIMIT)
    if opened:
        codec.receive_data(_HANDSHAKE)
        assert codec.is_open
        assert codec.events_received() == []
    events: list[FrameEvent] = []
    for chunk in chunks:
        codec.receive_data(chunk)
        codec.data_to_send()
        events += codec.events_received()
    for event in events:
        if isinstance(event, Frame):
            event.payload.decode()  # text messages are UTF-8 by the time they are frames
        else:
            assert isinstance(event, FrameError)
            assert event.fatal, event  # on WebSocket every framing error ends the link
            codec.send_close(event.code)
    check_events(events, _WS_FATAL)
    codec.receive_data(b"")
    codec.data_to_send()
    assert codec.events_received() == []


def cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` in chunks cut at `cuts` (no empty chunk: that would be EOF)."""
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# -- what hypothesis draws ---------------------------------------------------------------------

TOKENS = [
    *(b'"%s"' % w for w in (b"op", b"id", b"route", b"room", b"data", b"token", b"echo")),
    *(b'"%s"' % w for w in (b"auth", b"call", b"send", b"sub", b"unsub", b"ping", b"x" * 70)),
    b"{", b"}", b"[", b"]", b",", b":", b" ", b"\r", b"\n", b"\r\n", b"\x00",
    b"0", b"-1", b"1.5e3", b"1e400", b"-1e400", b"9223372036854775808", b"9" * 30,
    b"null", b"true", b"false", b"tru", b'"', b"\\", b'"\\u00e9"', b'"\\ud800"', b'"\\q"',
    b"\xff", b"\xc3\xa9", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"[" * 40, b"]" * 40,
]  # fmt: skip

fragments = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=6), max_size=30).map(b"".join)
#: Lengths around the limit, or anything.
lengths = st.sampled_from([0, 1, LIMIT - 1, LIMIT, LIMIT + 1, 2**31, 2**32 - 1]) | st.integers(
    0, 2**32 - 1
)


@st.composite
def len_segment(draw: st.DrawFn) -> bytes:
    """A length header (true, near the limit, or any) and a payload, or loose bytes."""
    payload = draw(fragments)
    kind = draw(st.sampled_from(["true", "any", "loose"]))
    if kind == "loose":
        return payload
    length = len(payload) if kind == "true" else draw(lengths)
    return struct.pack(">I", length) + payload


@st.composite
def ws_frame(draw: st.DrawFn) -> bytes:
    """One WebSocket frame with any header bits, mostly masked, or loose bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=20))
    opcode = draw(st.sampled_from([0, 1, 1, 1, 2, 8, 9, 10]) | st.integers(0, 15))
    fin, rsv = draw(st.booleans()), draw(st.sampled_from([0, 0, 0, 1, 4, 7]))
    payload = draw(fragments | st.binary(max_size=LIMIT + 8))
    length = draw(st.just(len(payload)) | lengths)
    masked = draw(st.integers(0, 9)) > 0
    header = bytes([fin << 7 | rsv << 4 | opcode])
    code = length if length < 126 else 126 if length < 2**16 else 127
    header += bytes([masked << 7 | code])
    if code == 126:
        header += struct.pack(">H", length)
    elif code == 127:
        header += struct.pack(">Q", length)
    if masked:
        key = draw(st.binary(min_size=4, max_size=4))
        header += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + payload


def streams(segments: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, list[int]]]:
    """A stream of segments, and where to cut it."""
    return (
        st.lists(segments, max_size=12)
        .map(b"".join)
        .flatmap(
            lambda data: st.tuples(st.just(data), st.lists(st.integers(0, len(data)), max_size=12))
        )
    )


line_segments = (fragments | st.binary(max_size=LIMIT + 8)).map(lambda b: b + b"\n") | fragments

# -- the CI targets ----------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None)
@given(streams(line_segments))
def test_newline_pipeline(stream: tuple[bytes, list[int]]) -> None:
    data, cuts = stream
    feed_stream("tcp", cut(data, cuts))


@settings(max_examples=EXAMPLES, deadline=None)
@given(streams(len_segment()))
@example((struct.pack(">I", LIMIT) + b"{" * LIMIT, [1, 5]))
def test_length_prefix_pipeline(stream: tuple[bytes, list[int]]) -> None:
    data, cuts = stream
    feed_stream("tcp+len", cut(data, cuts))


@settings(max_examples=EXAMPLES, deadline=None)
@given(streams(ws_frame()))
def test_websocket_pipeline_after_the_handshake(stream: tuple[bytes, list[int]]) -> None:
    data, cuts = stream
    feed_websocket(cut(data, cuts), opened=True)


@settings(max_examples=EXAMPLES // 3, deadline=None)
@given(streams(fragments | st.sampled_from([_HANDSHAKE[:20], _HANDSHAKE, b"\r\n\r\n"])))
# Found by a long run: a refused handshake (here 405) with bytes behind it that are
# not frames made websockets' second EOF assert inside the codec (fixed in websocket.py).
@example((b'"op"' + _HANDSHAKE + b'"op"', []))
@example((_HANDSHAKE.replace(b"GET / ", b"GET /elsewhere ") + b"\x00", []))
# Found by atheris: a target urlsplit refuses ("//[" is a bad IPv6 host) raised out
# of the codec (now a 404).
@example((_HANDSHAKE.replace(b"GET / ", b"GET //[x "), [3]))
def test_websocket_handshake_garbage(stream: tuple[bytes, list[int]]) -> None:
    data, cuts = stream
    feed_websocket(cut(data, cuts), opened=False)


@settings(max_examples=EXAMPLES, deadline=None)
@given(fragments)
def test_decode_fragments(payload: bytes) -> None:
    check_decoded(decode_message(payload))


# -- the long run (atheris) ----------------------------------------------------------------------


def fuzz_one(data: bytes) -> None:
    """atheris' entry: the first byte picks the target and the cuts, the rest is the input."""
    if len(data) < 2:
        return
    target, stride, body = data[0] % 5, data[1] % 16 + 1, data[2:]
    chunks = [body[i : i + stride] for i in range(0, len(body), stride)]
    if target == 0:
        feed_stream("tcp", chunks)
    elif target == 1:
        feed_stream("tcp+len", chunks)
    elif target == 2:
        feed_websocket(chunks, opened=True)
    elif target == 3:
        feed_websocket(chunks, opened=False)
    else:
        check_decoded(decode_message(body))


def main(argv: list[str]) -> None:
    atheris = importlib.import_module("atheris")  # outside CI only: not a dependency

    seconds = argv[1] if len(argv) > 1 else "300"
    atheris.instrument_all()  # coverage feedback from portao's (and websockets') Python code
    atheris.Setup([argv[0], f"-max_total_time={seconds}", "-max_len=4096", *argv[2:]], fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
