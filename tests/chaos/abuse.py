"""Abuse against a live gateway: a `portao run` process, regulars that must not notice, raw sockets.

`Live` is one `portao run` (gateway and embedded workers of the demo app on the
memory broker) with tcp://, tcp+len:// and ws:// listeners and an admin port, all
on spare ports; `/proc/PID` gives its open files and RSS. `Regulars` are a few
`portao.client` connections (one per scheme) that keep calling `echo` and chatting
in a room while a scenario abuses the gateway, and account for everything: each
call gets exactly one correct reply, and each line said in the room reaches every
member exactly once (no fault is injected, so room pushes must not be lost either).
Their row goes to the chaos report (tests/chaos/fleet.py).

The abusers are raw sockets: they must be able to do what no client library does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection as WsConnection
from websockets.asyncio.client import connect as ws_connect

from portao.client import Client, connect
from portao.errors import ConnectionClosed, RequestError
from tests.chaos.fleet import Tally, report, token
from tests.gateway.conftest import RawClient, eventually
from tests.ops.admin import Scrape, scrape, until
from tests.procs import Procs, free_port, wait_port

T = TypeVar("T")

#: The listeners of a live gateway, in the order regulars use them.
SCHEMES = ("tcp", "tcp+len", "ws")
#: What an abuser may read from the gateway, whatever it sent.
DOCUMENTED_CODES = frozenset(
    {"bad_frame", "bad_request", "too_large", "unauthorized", "rate_limited", "idle_timeout"}
)


@dataclass
class Live:
    """A `portao run` process and its ports (`tcp`, `tcp+len`, `ws`, `admin`)."""

    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path
    #: How to close the clients opened on it, should a scenario fail half-way.
    closers: list[Callable[[], Awaitable[object]]] = field(default_factory=list)

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.ports[scheme]}" + ("/" if scheme == "ws" else "")

    async def metrics(self) -> Scrape:
        return await scrape(f"http://127.0.0.1:{self.ports['admin']}")

    async def connections(self) -> int:
        return int((await self.metrics()).value("portao_gateway_connections_open"))

    async def settle(self, connections: int, timeout_s: float = 15.0) -> None:
        """Wait until exactly `connections` are open (the abusers are gone)."""

        async def settled() -> bool:
            return await self.connections() == connections

        await until(settled, timeout_s)

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    async def files_back_to(self, baseline: int, timeout_s: float = 5.0) -> int:
        """Wait until the process holds at most `baseline` open files; how many it holds.

        A socket closed a moment ago (an admin scrape, the last abuser) may linger
        briefly; a leaked one never goes.
        """
        deadline = time.monotonic() + timeout_s
        while (files := self.open_files()) > baseline:
            assert time.monotonic() < deadline, f"{files} open files, {baseline} before"
            await asyncio.sleep(0.05)
        return files

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    async def close_clients(self) -> None:
        for close in self.closers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await close()

    def assert_healthy(self) -> None:
        """Still running, and nothing logged as an error but dead-lettered messages."""
        assert self.process.poll() is None, f"portao run exited with {self.process.returncode}"
        for line in self.log.read_text(errors="replace").splitlines():
            if " ERROR " in line or " CRITICAL " in line:
                assert "dead-lettered" in line, line


def start_live(procs: Procs) -> Live:
    """`portao run` on spare ports; its settings come from `procs`' environment."""
    ports = {name: free_port() for name in (*SCHEMES, "admin")}
    listen = [f"{s}://127.0.0.1:{ports[s]}" for s in SCHEMES]
    args = [arg for url in listen for arg in ("--listen", url)]
    process = procs.spawn("run", *args, "--admin", f"127.0.0.1:{ports['admin']}", name="run")
    for port in ports.values():
        wait_port(port, proc=process)
    return Live(process, ports, procs.log_dir / "run.log")


def raise_open_files(needed: int) -> None:
    """Lift this process's soft open-file limit to the hard one; fail if that is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, f"hard limit {hard} < {needed}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- regular clients -----------------------------------------------------------------------


class Regulars:
    """`size` clients (tcp, tcp+len, ws in turn) calling `echo` and chatting in `room`."""

    def __init__(self, live: Live, size: int = 3, room: str = "lobby", pause_s: float = 0.02):
        self.live = live
        self.urls = [live.url(SCHEMES[i % len(SCHEMES)]) for i in range(size)]
        self.room = room
        self.pause_s = pause_s
        self.clients: list[Client] = []
        self.sent = 0
        self.answered = 0
        self.problems: list[str] = []
        self.said: list[str] = []
        self.heard: list[Counter[str]] = []
        self.latencies_s: list[float] = []
        self._listeners: list[asyncio.Task[None]] = []
        self._counters = [itertools.count() for _ in self.urls]  # keys stay unique

    async def __aenter__(self) -> Regulars:
        for index, url in enumerate(self.urls):
            client = await connect(url, token=token(f"regular{index}"), request_timeout_s=15.0)
            self.clients.append(client)
            await client.call("chat.join", {"room": self.room})
            heard: Counter[str] = Counter()
            self.heard.append(heard)
            self._listeners.append(asyncio.create_task(self._listen(client, heard)))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self.clients:
            await client.aclose()
        await asyncio.gather(*self._listeners)

    async def _listen(self, client: Client, heard: Counter[str]) -> None:
        async for push in client.pushes():
            if push.room == self.room:
                heard[push.data["text"]] += 1

    async def during(self, abuse: Awaitable[T], at_least_s: float = 1.0) -> T:
        """Keep every regular calling and chatting while `abuse` runs (and `at_least_s`)."""
        stop = asyncio.Event()
        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for index, client in enumerate(self.clients):
                group.create_task(self._lane(index, client, stop))
            try:
                result = await abuse
                await asyncio.sleep(at_least_s - (time.monotonic() - started))
            finally:
                stop.set()
        return result

    async def _lane(self, index: int, client: Client, stop: asyncio.Event) -> None:
        counter = self._counters[index]
        while not stop.is_set():
            n = next(counter)
            key = f"{index}-{n}"
            if n % 2:
                route, data = "chat.say", {"room": self.room, "text": key}
                expected: Any = {"delivered": True}
            else:
                route, data, expected = "echo", {"key": key}, {"key": key}
            self.sent += 1
            started = time.monotonic()
            try:
                reply = await client.call(route, data)
            except (RequestError, TimeoutError) as exc:
                self.problems.append(f"{route} {key}: {exc!r}")
            except ConnectionClosed as exc:
                self.problems.append(f"regular {index} lost its connection: {exc!r}")
                return
            else:
                self.latencies_s.append(time.monotonic() - started)
                if reply == expected:
                    self.answered += 1
                    if route == "chat.say":
                        self.said.append(key)
                else:
                    self.problems.append(f"{route} {key}: wrong reply {reply!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.pause_s)

    async def account(self, scenario: str, **notes: int) -> Tally:
        """Judge what the regulars saw, add the row to the report; fails the test on a problem.

        `notes` are the scenario's own figures, shown in the row. The gateway must
        still be running, with no error in its log.
        """
        self.live.assert_healthy()
        with contextlib.suppress(AssertionError):  # judged below
            await eventually(self._all_heard)
        unmatched = []
        for client in self.clients:
            with contextlib.suppress(TimeoutError):
                while True:
                    unmatched.append(await client.recv_raw(timeout_s=0.05))
        tally = Tally(scenario, sent=self.sent, answered=self.answered)
        tally.lost = self.sent - self.answered
        missing = sum(1 for heard in self.heard for key in self.said if heard[key] == 0)
        twice = sum(1 for heard in self.heard for count in heard.values() if count > 1)
        tally.doubled = len(unmatched) + twice
        tally.problems += self.problems[:20]
        tally.problems += [f"answer nobody asked for: {m}" for m in unmatched[:5]]
        if missing:
            tally.problems.append(f"{missing} chat pushes never arrived")
        if twice:
            tally.problems.append(f"{twice} chat pushes arrived twice")
        tally.notes["pushes"] = sum(heard.total() for heard in self.heard)
        if self.latencies_s:
            tally.notes["median ms"] = round(statistics.median(self.latencies_s) * 1000)
            tally.notes["max ms"] = round(max(self.latencies_s) * 1000)
        tally.notes.update(notes)
        return report(tally)

    def _all_heard(self) -> bool:
        return all(heard[key] for heard in self.heard for key in self.said)


async def together(*abusers: Coroutine[Any, Any, T]) -> list[T]:
    """Run `abusers` at once; the first failure cancels the others (none left running)."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(abuser) for abuser in abusers]
    return [task.result() for task in tasks]


# -- raw sockets ---------------------------------------------------------------------------


async def dial(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking socket connected to the gateway; `rcvbuf` shrinks its receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def reset_on_close(sock: socket.socket) -> None:
    """Make `close()` send RST instead of FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def read_to_end(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the gateway writes until it closes the socket (EOF or reset)."""
    loop = asyncio.get_running_loop()
    chunks = []
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


async def trickle(sock: socket.socket, data: bytes, interval_s: float) -> int:
    """Send `data` one byte per `interval_s` until done or the gateway hangs up; bytes sent."""
    loop = asyncio.get_running_loop()
    for sent in range(len(data)):
        try:
            await loop.sock_sendall(sock, data[sent : sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent
        await asyncio.sleep(interval_s)
    return len(data)


def parse(data: bytes, scheme: str) -> list[dict[str, Any]]:
    """The gateway's messages in `data`, framed as `scheme` frames them (a cut tail is dropped)."""
    if scheme == "tcp":
        *lines, _ = data.split(b"\n")
        return [json.loads(line) for line in lines]
    messages, pos = [], 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        if pos + 4 + size > len(data):
            break
        messages.append(json.loads(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return messages


def frame(payload: bytes, scheme: str) -> bytes:
    """`payload` framed for a stream listener."""
    return payload + b"\n" if scheme == "tcp" else struct.pack(">I", len(payload)) + payload


async def raw_client(
    live: Live, scheme: str, user: str | None = None, *, rcvbuf: int | None = None
) -> RawClient:
    """tests/gateway's raw client on a live listener, authenticated as `user` when given.

    It takes answers up to 1 MiB; with `rcvbuf`, its socket's receive buffer and its
    reader's are that small, so one that stops reading stops the gateway's writes soon.
    """
    sock = await dial(live.ports[scheme], rcvbuf=rcvbuf)
    reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf or 2**20)
    client = RawClient(reader, writer, scheme)
    live.closers.append(client.aclose)
    if user is not None:
        answer = await client.request({"op": "auth", "token": token(user)})
        assert answer == {"op": "ok", "user": user}, answer
    return client


async def ws_client(live: Live, user: str | None = None) -> WsConnection:
    """A websockets client on the live ws:// listener, authenticated as `user` when given."""
    ws = await ws_connect(
        live.url("ws"), compression=None, max_size=None, ping_interval=None, proxy=None
    )
    live.closers.append(ws.close)
    if user is not None:
        await ws.send(json.dumps({"op": "auth", "token": token(user)}))
        assert json.loads(await ws.recv()) == {"op": "ok", "user": user}
    return ws


async def ws_close_code(ws: WsConnection, timeout_s: float = 5.0) -> int | None:
    """The close code the gateway sent, once the connection is closed."""
    async with asyncio.timeout(timeout_s):
        await ws.wait_closed()
    return ws.close_code
