"""Memory per idle connection: an asyncio.Protocol object vs a task per connection.

Why portao's gateway uses a Protocol: each server below holds N idle loopback
connections on uvloop; we read the server process's RSS before and after. The
Protocol server keeps one small object per connection; the task server keeps a
task, a coroutine frame, a StreamReader and a StreamWriter.

    python bench/protocol_vs_task.py --connections 5000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time

import uvloop


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(line)


def serve(kind: str, port: int, ready: mp.Event) -> None:  # type: ignore[valid-type]
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))

    async def main() -> None:
        if kind == "protocol":
            await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, backlog=4096)
        else:
            await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        ready.set()
        await asyncio.sleep(3600)

    uvloop.run(main())


def measure(kind: str, n: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = mp.Event()
    proc = mp.Process(target=serve, args=(kind, port, ready), daemon=True)
    proc.start()
    ready.wait(10)
    time.sleep(0.3)
    before = rss_kib(proc.pid)
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for c in conns:  # make every connection round-trip once
        c.sendall(b"x\n")
    for c in conns:
        c.recv(2)
    time.sleep(0.5)
    after = rss_kib(proc.pid)
    for c in conns:
        c.close()
    proc.kill()
    proc.join()
    return (after - before) * 1024 / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    results: dict[str, list[float]] = {"protocol": [], "task": []}
    for _ in range(args.runs):
        for kind in results:
            results[kind].append(measure(kind, args.connections))
    for kind, values in results.items():
        runs = [round(v) for v in values]
        print(f"{kind:9s} median {statistics.median(values):7.0f} B/conn  runs {runs}")
    ratio = statistics.median(results["task"]) / statistics.median(results["protocol"])
    print(f"task/protocol memory ratio: {ratio:.2f}x (pid {os.getpid()}, N={args.connections})")


if __name__ == "__main__":
    main()
