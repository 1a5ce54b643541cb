"""Memory per idle, authenticated connection: tcp:// vs ws:// vs ws:// with permessage-deflate.

A gateway (memory broker, uvloop) runs in a child process with three listeners; the
parent opens N connections on one listener at a time, authenticates them, and asks
the child for its traced Python memory (tracemalloc, zlib's buffers included) and its
RSS before and after. Kernel socket buffers count in neither.

    python bench/ws_cost.py --connections 1000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import time
import tracemalloc
from multiprocessing.connection import Connection
from typing import Any

import uvloop
from websockets.asyncio.client import connect as ws_connect

from portao.broker.memory import MemoryBroker
from portao.config import Settings
from portao.gateway.listeners import parse_listen
from portao.gateway.server import Gateway
from portao.session.auth import TokenVerifier, mint_token

SECRET = "bench-secret-" + "b" * 32
KINDS = ("tcp", "ws", "ws+deflate")


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def serve(pipe: Connection) -> None:
    tracemalloc.start()
    uvloop.run(_serve(pipe))


async def _serve(pipe: Connection) -> None:
    settings = Settings(jwt_secret=SECRET, prefix="bench", listen=[])
    broker = MemoryBroker(settings)
    gateway = Gateway(settings, broker, broker, TokenVerifier.from_settings(settings))
    specs = [parse_listen(u, settings) for u in ("tcp://127.0.0.1:0", "ws://127.0.0.1:0")]
    ws = specs[1].websocket
    assert ws is not None
    deflate = dataclasses.replace(specs[1], websocket=dataclasses.replace(ws, compression=True))
    gateway.specs = [*specs, deflate]
    await gateway.start()
    pipe.send([port for _, port in gateway.addresses])
    loop = asyncio.get_running_loop()
    while (command := await loop.run_in_executor(None, pipe.recv)) != "stop":
        assert command == "measure"
        pipe.send((tracemalloc.get_traced_memory()[0], rss_kib(), len(gateway.conns)))
    await gateway.drain()
    await gateway.aclose()


async def open_idle(kind: str, port: int, n: int, token: str) -> list[Any]:
    auth = json.dumps({"op": "auth", "token": token})
    held: list[Any] = []
    for _ in range(n):
        if kind == "tcp":
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(auth.encode() + b"\n")
            assert b'"ok"' in await reader.readline()
            held.append(writer)
        else:
            ws = await ws_connect(
                f"ws://127.0.0.1:{port}/", proxy=None, ping_interval=None,
                compression="deflate" if kind == "ws+deflate" else None,
            )
            await ws.send(auth)
            assert '"ok"' in str(await ws.recv())
            held.append(ws)
    return held


async def close_all(kind: str, held: list[Any]) -> None:
    for conn in held:
        if kind == "tcp":
            conn.close()
        else:
            await conn.close()


async def measure(pipe: Connection, ports: list[int], n: int) -> dict[str, tuple[float, float]]:
    token = mint_token(SECRET, "idle", now=time.time(), ttl_s=3600)
    results = {}
    for kind, port in zip(KINDS, ports, strict=True):
        pipe.send("measure")
        traced0, rss0, _ = pipe.recv()
        held = await open_idle(kind, port, n, token)
        await asyncio.sleep(0.5)  # let the gateway finish binding users
        pipe.send("measure")
        traced1, rss1, conns = pipe.recv()
        assert conns == n, conns
        results[kind] = ((traced1 - traced0) / n / 1024, (rss1 - rss0) / n)
        await close_all(kind, held)
        while True:  # wait until the gateway has let them all go
            pipe.send("measure")
            if pipe.recv()[2] == 0:
                break
            await asyncio.sleep(0.05)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    parent, child = mp.Pipe()
    process = mp.get_context("spawn").Process(target=serve, args=(child,))
    process.start()
    ports = parent.recv()
    try:
        results = uvloop.run(measure(parent, ports, args.connections))
    finally:
        parent.send("stop")
        process.join(30)
    print(f"{args.connections} idle authenticated connections per listener")
    print(f"{'listener':<12} {'traced KiB/conn':>16} {'RSS KiB/conn':>13}")
    for kind, (traced, rss) in results.items():
        print(f"{kind:<12} {traced:>16.1f} {rss:>13.1f}")


if __name__ == "__main__":
    main()
