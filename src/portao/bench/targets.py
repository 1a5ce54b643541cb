"""The servers a comparison runs against, each started fresh as its own processes.

`bare` (uvloop echo), `baseline` (thread per client), `run` (`portao run`, memory
broker) and `redis` (`portao gateway` + `portao worker` over Redis Streams). A
target is ready once a real call through it is answered; its `pid` is the
process holding the connections (the gateway), whose memory the scenarios sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis

from portao.bench.link import Link, open_link
from portao.bench.loadgen import link_url
from portao.bench.scenarios import DIALECTS
from portao.session.auth import mint_token

READY_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 15.0
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

KINDS = {
    "bare": "bare uvloop echo",
    "baseline": "thread per client",
    "run": "portao run (memory)",
    "redis": "gateway + worker (Redis)",
    "socketio": "python-socketio (Redis manager)",
    "run-ws": "portao run, WebSocket",
    "redis-ws": "gateway + worker (Redis), WebSocket",
}
SCHEMES = {"socketio": "socketio", "run-ws": "ws", "redis-ws": "ws"}


@dataclass
class Target:
    """A started server: where it listens and the processes that make it."""

    kind: str
    url: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[typing.IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.processes[0].pid

    @property
    def label(self) -> str:
        return KINDS[self.kind]


def _commands(kind: str, url: str, redis_url: str, prefix: str) -> list[list[str]]:
    python = [sys.executable, "-m"]
    quiet = ["--log-level", "warning"]
    match kind:
        case "bare":
            return [[*python, "portao.cli", "bench", "bare", "--listen", url]]
        case "baseline":
            return [[*python, "portao.cli", "bench", "baseline", "--listen", url]]
        case "run" | "run-ws":
            return [[*python, "portao.cli", "run", "--listen", url, *quiet]]
        case "socketio":
            channel = f"bench{uuid.uuid4().hex[:8]}"
            return [[*python, "portao.cli", "bench", "socketio", "--listen", url,
                     "--redis", redis_url, "--channel", channel]]
        case "redis" | "redis-ws":
            broker = ["--broker", redis_url, "--prefix", prefix, *quiet]
            return [
                [*python, "portao.cli", "gateway", "--listen", url, *broker],
                [*python, "portao.cli", "worker", *broker],
            ]
    raise ValueError(f"unknown target {kind!r} (known: {', '.join(KINDS)})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def started(kind: str, secret: str, redis_url: str = DEFAULT_REDIS) -> Iterator[Target]:
    """Start a target, wait until it answers a call, stop it on exit."""
    scheme = SCHEMES.get(kind, "tcp")
    url = f"{scheme}://127.0.0.1:{free_port()}" + ("/" if scheme == "ws" else "")
    env = {**os.environ, "PORTAO_JWT_SECRET": secret}
    target = Target(kind, url)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        if kind.startswith("redis"):
            stack.callback(delete_prefix, redis_url, prefix)
        stack.callback(stop, target)
        for command in _commands(kind, url, redis_url, prefix):
            log = stack.enter_context(tempfile.TemporaryFile())
            target.logs.append(log)
            target.processes.append(
                subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=log)
            )
        wait_answering(target, secret)
        yield target


def delete_prefix(redis_url: str, prefix: str) -> None:
    """The run's keys leave with it: the Redis it used is usually not the bench's own."""
    client = redis.Redis.from_url(redis_url)
    with contextlib.closing(client):
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


def stop(target: Target) -> None:
    for process in target.processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in target.processes:
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_answering(target: Target, secret: str) -> None:
    """Until a call through the target is answered (workers registered, broker up)."""
    token = mint_token(secret, "probe", ttl_s=600, now=time.time())
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "not started"
    while time.monotonic() < deadline:
        for process, log in zip(target.processes, target.logs, strict=True):
            if process.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise RuntimeError(f"{target.kind} exited with {process.returncode}: {err[-800:]}")
        try:
            last = asyncio.run(_probe(target.url, token))
        except (OSError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if last == "reply":
            return
        time.sleep(0.2)
    raise RuntimeError(f"{target.kind} did not answer a call in {READY_TIMEOUT_S:.0f} s: {last}")


class _Probe:
    """A sink for one call: remembers how it ended."""

    def __init__(self) -> None:
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def completed(self, link: Link, started: float, now: float, code: str | None) -> None:
        if not self.done.done():
            self.done.set_result(code or "reply")

    def pushed(self, link: Link, data: bytes, now: float) -> None:
        pass

    def lost(self, link: Link, code: str | None) -> None:
        if not self.done.done():
            self.done.set_result(f"closed ({code})")


async def _probe(url: str, token: str) -> str:
    """Auth and one echo call through the target, in the dialect its URL implies."""
    address, dialect_name = link_url(url)
    dialect = DIALECTS[dialect_name]
    sink = _Probe()
    link = await open_link(address, None, sink, dialect, PROBE_TIMEOUT_S)
    try:
        answer = await link.request(dialect.auth(token), PROBE_TIMEOUT_S)
        if answer.op != "ok":
            return f"auth: {answer.op} {answer.code}"
        link.call(b"echo", b"1", time.time())
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            return await sink.done
    finally:
        link.close()
