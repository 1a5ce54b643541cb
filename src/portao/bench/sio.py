"""Socket.IO v5 over Engine.IO v4, as the load generator speaks it (client side).

The same scenarios drive a python-socketio server: `auth` is the namespace
connect packet with the token, a call is an event with an ack id, `sub` and
`ping` are events acked with ids no call reaches, a push is an emitted event.
Engine.IO pings ("2") are answered at once ("3").
"""

from __future__ import annotations

import msgspec

from portao.bench.link import Answer, Dialect, Link

SUB_ACK = 1 << 40
PING_ACK = SUB_ACK + 1

_list = msgspec.json.Decoder(list[msgspec.Raw]).decode
_dict = msgspec.json.Decoder(dict[str, object]).decode


class SocketIoDialect(Dialect):
    def auth(self, token: str) -> bytes:
        return b'40{"token":"%s"}' % token.encode()

    def sub(self, room: str) -> bytes:
        return b'42%d["sub","%s"]' % (SUB_ACK, room.encode())

    def ping(self) -> bytes:
        return b'42%d["bench.ping"]' % PING_ACK

    def call(self, id: int, route: bytes, data: bytes) -> bytes:
        return b'42%d["%s",%s]' % (id, route, data)

    def answers(self, link: Link, payload: bytes) -> list[Answer]:
        try:
            return self._answers(link, payload)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            return [Answer("error", code="bench: undecodable answer")]

    def _answers(self, link: Link, payload: bytes) -> list[Answer]:
        kind = payload[:2]
        if payload == b"2":  # Engine.IO ping
            link.send_messages([b"3"])
            return []
        if kind == b"40":
            return [Answer("ok")]
        if kind == b"44":
            return [Answer("error", code="unauthorized")]
        if kind == b"41":
            return [Answer("bye", code="disconnected")]
        if kind == b"42":
            body = _list(payload[2:])
            return [Answer("push", data=body[1] if len(body) > 1 else msgspec.Raw(b"null"))]
        if kind == b"43":
            start = payload.index(b"[")
            ack = int(payload[2:start])
            body = _list(payload[start:])
            if ack == SUB_ACK:
                return [Answer("ok")]
            if ack == PING_ACK:
                return [Answer("pong")]
            return [Answer("reply", id=ack, data=body[0] if body else msgspec.Raw(b"null"))]
        return []  # Engine.IO open ("0{...}"), noop


SOCKETIO = SocketIoDialect()
