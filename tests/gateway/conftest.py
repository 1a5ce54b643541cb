"""An in-process stack (memory broker, gateway, embedded worker) and a raw client.

The raw client speaks the wire protocol with its own few lines of framing, on a
real loopback socket, so gateway tests do not depend on the code under test to
read its answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from portao.broker.memory import MemoryBroker
from portao.config import Settings
from portao.demo import app as demo_app
from portao.gateway.server import Gateway
from portao.session.auth import TokenVerifier, mint_token
from portao.worker.app import App
from portao.worker.runner import Worker

SECRET = "test-secret-" + "x" * 32


class RawClient:
    """A minimal wire-protocol client: JSON objects over newline or length framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: str):
        self.reader = reader
        self.writer = writer
        self.framing = framing

    async def send(self, obj: Any) -> None:
        await self.send_bytes(json.dumps(obj).encode())

    async def send_bytes(self, payload: bytes) -> None:
        if self.framing == "tcp":
            self.writer.write(payload + b"\n")
        else:
            self.writer.write(struct.pack(">I", len(payload)) + payload)
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout_s: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            if self.framing == "tcp":
                line = await self.reader.readline()
                if not line:
                    raise EOFError("connection closed")
                result: dict[str, Any] = json.loads(line)
                return result
            header = await self.reader.readexactly(4)
            (size,) = struct.unpack(">I", header)
            body = await self.reader.readexactly(size)
            out: dict[str, Any] = json.loads(body)
            return out

    async def request(self, obj: Any, timeout_s: float = 5.0) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv(timeout_s)

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The first message matching `predicate`, and the ones seen before it."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if predicate(message):
                return message, seen
            seen.append(message)

    async def closed(self, timeout_s: float = 5.0) -> bool:
        """True once the gateway closed the socket (reads EOF)."""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    return True
                if not data:
                    return True

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@dataclass
class Stack:
    settings: Settings
    broker: MemoryBroker
    gateway: Gateway
    worker: Worker
    clients: list[RawClient] = field(default_factory=list)

    def token(
        self, sub: str = "alice", *, rooms: list[str] | None = None, ttl_s: float | None = 3600
    ) -> str:
        return mint_token(SECRET, sub, rooms=rooms, ttl_s=ttl_s, now=time.time())

    def address(self, index: int = 0) -> tuple[str, int]:
        return self.gateway.addresses[index]

    async def raw(self, index: int = 0) -> RawClient:
        host, port = self.address(index)
        reader, writer = await asyncio.open_connection(host, port)
        framing = self.gateway.specs[index].scheme
        client = RawClient(reader, writer, framing)
        self.clients.append(client)
        return client

    async def authed(self, sub: str = "alice", index: int = 0, **kw: Any) -> RawClient:
        client = await self.raw(index)
        answer = await client.request({"op": "auth", "token": self.token(sub, **kw)})
        assert answer == {"op": "ok", "user": sub}
        return client


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack_factory(prefix: str) -> AsyncIterator[StackFactory]:
    """Start stacks with settings overrides; everything is torn down after the test."""
    started: list[tuple[Stack, asyncio.Task[None]]] = []

    async def start(app: App = demo_app, **overrides: Any) -> Stack:
        values: dict[str, Any] = {
            "prefix": prefix,
            "jwt_secret": SECRET,
            "listen": ["tcp://127.0.0.1:0", "tcp+len://127.0.0.1:0"],
            "retry_delay_s": 0.05,
            "drain_timeout_s": 3.0,
        }
        values.update(overrides)
        settings = Settings(**values)
        broker = MemoryBroker(settings)
        await broker.connect()
        await broker.register_routes(app.routes)
        worker = Worker(app, broker, broker, settings, fetch_timeout_s=0.1)
        task = asyncio.create_task(worker.run())
        gateway = Gateway(settings, broker, broker, TokenVerifier.from_settings(settings))
        await gateway.start()
        stack = Stack(settings, broker, gateway, worker)
        started.append((stack, task))
        return stack

    yield start
    for stack, task in started:
        for client in stack.clients:
            await client.aclose()
        await stack.gateway.drain()
        await stack.worker.stop()
        await task
        await stack.gateway.aclose()


@pytest.fixture
async def stack(stack_factory: StackFactory) -> Stack:
    return await stack_factory()


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `predicate()` holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
