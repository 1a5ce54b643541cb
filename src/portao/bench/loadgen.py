"""The load generator's parent: split the work, start the processes, add up results.

Connections and offered rate are split evenly over `processes` spawned
processes (each stays under 20,000 open files). The parent times the connect
phase, samples the server's memory before and after, starts every process at
one shared instant, shows progress and merges the histograms.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any
from urllib.parse import urlsplit

from portao.bench import probe
from portao.bench.latency import merge, summary_ms
from portao.bench.process import child_main
from portao.bench.scenarios import Plan

#: Each load-generator process holds at most this many connections (fd limit 20,000).
MAX_PER_PROCESS = 18_000
START_DELAY_S = 0.3
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Options:
    """One scenario run, as given on the command line."""

    scenario: str
    target: str = "tcp://127.0.0.1:7878"
    connections: int = 1000
    processes: int = 0  # 0: as few as the fd limit allows
    duration_s: float = 10.0
    warmup_s: float = 1.0
    rate: float = 0.0  # rpc: calls/s offered (0 = closed loop); fanout: messages/s
    depth: int = 1
    route: str = "echo"
    payload_bytes: int = 16
    room: str = "bench.room"
    secret: str = ""
    server_pid: int | None = None
    connect_concurrency: int = 256
    timeout_s: float = 10.0

    @property
    def process_count(self) -> int:
        return self.processes or max(1, math.ceil(self.connections / MAX_PER_PROCESS))


SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"


def parse_target(url: str) -> tuple[str, int]:
    """(host, port) of a target: tcp://H:P, ws://H:P[/path] or socketio://H:P."""
    parts = urlsplit(url)
    if parts.scheme not in ("tcp", "ws", "socketio") or not parts.hostname or not parts.port:
        raise ValueError(f"target {url!r}: expected tcp://H:P, ws://H:P[/path] or socketio://H:P")
    return parts.hostname, parts.port


def link_url(url: str) -> tuple[str, str]:
    """The URL a link connects to and the dialect it speaks there."""
    if url.startswith("socketio://"):
        host, port = parse_target(url)
        return f"ws://{host}:{port}{SOCKETIO_PATH}", "socketio"
    return url, "portao"


def plans(options: Options) -> list[Plan]:
    """Each process's share: connections and rate split as evenly as they go."""
    host, _ = parse_target(options.target)
    url, dialect = link_url(options.target)
    count = options.process_count
    base = Plan(
        scenario=options.scenario, url=url, host=host, dialect=dialect, index=0, connections=0,
        first=0,
        secret=options.secret, duration_s=options.duration_s, warmup_s=options.warmup_s,
        rate=0.0, depth=options.depth, route=options.route,
        payload_bytes=options.payload_bytes, room=options.room,
        connect_concurrency=options.connect_concurrency, timeout_s=options.timeout_s,
    )
    out, first = [], 0
    for index in range(count):
        share = options.connections // count + (index < options.connections % count)
        rate = options.rate / count
        if options.scenario == "fanout":  # one sender, in process 0
            rate = options.rate if index == 0 else 0.0
        out.append(replace(base, index=index, connections=share, first=first, rate=rate))
        first += share
    return out


def run(options: Options, progress: Progress | None = None) -> dict[str, Any]:
    """Run one scenario and return its result (see docs/benchmarks.md for the fields)."""
    _, port = parse_target(options.target)
    pid = options.server_pid or probe.listener_pid(port)
    machine = probe.machine()
    before = probe.sample(pid)
    context = _context()
    pipes: list[Connection] = []
    processes = []
    for plan in plans(options):
        parent_end, child_end = context.Pipe()
        process = context.Process(target=child_main, args=(plan, child_end), daemon=True)
        process.start()
        child_end.close()
        pipes.append(parent_end)
        processes.append(process)
    try:
        _gather(pipes, "spawned", None, "")
        connect_started = time.monotonic()
        for pipe in pipes:
            pipe.send(("connect", None))
        _gather(pipes, "ready", progress, f"{options.scenario}: connecting")
        connect_s = time.monotonic() - connect_started
        connected = probe.sample(pid)
        start_at = time.time() + START_DELAY_S
        for pipe in pipes:
            pipe.send(("go", start_at))
        results = _gather(pipes, "done", progress, f"{options.scenario}: running", start_at)
        after = probe.sample(pid)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return _summarize(options, results, connect_s, pid, machine, (before, connected, after))


def _context() -> multiprocessing.context.ForkServerContext:
    """Fork-server processes: a clean interpreter (no inherited event loop) that
    has imported the load generator once, so each run starts its processes fast."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["portao.bench.process"])
    return context


def _gather(
    pipes: list[Connection],
    wanted: str,
    progress: Progress | None,
    label: str,
    start_at: float | None = None,
) -> list[Any]:
    """Wait for message `wanted` from every process, showing ticks as they come."""
    results: dict[int, Any] = {}
    ticks: dict[int, dict[str, int]] = {}
    shown = 0.0
    while len(results) < len(pipes):
        for ready in wait([p for i, p in enumerate(pipes) if i not in results], timeout=1.0):
            assert isinstance(ready, Connection)
            index = pipes.index(ready)
            try:
                kind, body = ready.recv()
            except EOFError:
                raise RuntimeError(f"load-generator process {index} died") from None
            if kind == "tick":
                ticks[index] = body
            elif kind == wanted:
                results[index] = body
                if isinstance(body, dict) and "connected" in body and wanted == "ready":
                    ticks[index] = body
        if progress is not None and time.monotonic() - shown >= 1.0 and ticks:
            shown = time.monotonic()
            progress(_progress_line(label, ticks, start_at))
    return [results[i] for i in range(len(pipes))]


def _progress_line(label: str, ticks: dict[int, dict[str, int]], start_at: float | None) -> str:
    total: Counter[str] = Counter()
    for tick in ticks.values():
        total.update(tick)
    line = f"{label}: {total['connected']:,} connected"
    if start_at is not None:
        elapsed = max(0.0, time.time() - start_at)
        line += f", t={elapsed:.0f}s, {total['done']:,} done, {total['errors']:,} errors"
    return line


def _summarize(
    options: Options,
    results: list[dict[str, Any]],
    connect_s: float,
    pid: int | None,
    machine: dict[str, Any],
    samples: tuple[dict[str, int] | None, ...],
) -> dict[str, Any]:
    counters: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    connect_errors: Counter[str] = Counter()
    closed_by: Counter[str] = Counter()
    for result in results:
        counters.update({k: v for k, v in result.items() if isinstance(v, int)})
        errors.update(result["errors"])
        connect_errors.update(result["connect_errors"])
        closed_by.update(result["closed_by"])
    histogram = merge([r["histogram"] for r in results])
    before, connected, after = samples
    out: dict[str, Any] = {
        "scenario": options.scenario,
        "target": options.target,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "connections": options.connections,
        "connected": counters["connected"],
        "processes": options.process_count,
        "duration_s": options.duration_s,
        "warmup_s": options.warmup_s,
        "connect_s": round(connect_s, 3),
        "connect_errors": dict(connect_errors),
        "done": counters["done"],
        "per_s": round(counters["done"] / options.duration_s, 1),
        "errors": dict(errors),
        "closed_by": dict(closed_by),
        "unanswered": counters["unanswered"],
        "latency_ms": summary_ms(histogram),
        "server": {"pid": pid, "before": before, "connected": connected, "after": after},
        "machine": machine,
    }
    if before and connected and counters["connected"]:
        grown = connected["rss_bytes"] - before["rss_bytes"]
        out["server"]["bytes_per_connection"] = round(grown / counters["connected"])
    if options.scenario == "rpc":
        out["mode"] = "open" if options.rate else "closed"
        out["offered_per_s"] = options.rate or None
        out["depth"] = options.depth if not options.rate else None
        out["route"] = options.route
        out["payload_bytes"] = options.payload_bytes
    if options.scenario == "fanout":
        out["messages"] = counters["messages"]
        out["deliveries"] = counters["deliveries"]
        out["offered_messages_per_s"] = options.rate or None
    return out
