"""`portao bench compare`: the brief's before/after table, measured in one run.

For each repeat, every target is started fresh and measured in turn (so drift on
a shared machine hits all of them alike): idle memory per connection, echo
throughput and p99 at full speed, and a ramp of connections making one call per
second each until p99 passes the limit. Ratios are taken within each repeat and
reported as medians over the repeats.
"""

from __future__ import annotations

import socket
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from portao.bench import loadgen, report, targets
from portao.bench.loadgen import Options, Progress

KIB = 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """What one comparison measures."""

    targets: tuple[str, ...] = ("bare", "baseline", "run", "redis")
    repeats: int = 3
    idle_connections: int = 10_000
    rpc_connections: int = 1000
    rpc_processes: int = 2
    rpc_depth: int = 1
    capacity_depth: int = 8
    duration_s: float = 5.0
    ramp: tuple[int, ...] = (1000, 2000, 4000, 8000, 16000)
    ramp_rate_per_connection: float = 1.0
    ramp_p99_ms: float = 100.0
    redis_url: str = "redis://127.0.0.1:6379/0"


def run(plan: Plan, secret: str, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every target `plan.repeats` times; return the runs and the summary."""
    kinds = [k for k in plan.targets if k != "redis" or _redis_up(plan.redis_url)]
    runs: list[dict[str, Any]] = []
    for repeat in range(plan.repeats):
        for kind in kinds:
            if progress is not None:
                progress(f"compare: repeat {repeat + 1}/{plan.repeats}, {targets.KINDS[kind]}")
            with targets.started(kind, secret, plan.redis_url) as target:
                runs.append({"target": kind, "repeat": repeat,
                             **measure(plan, target, secret, progress)})
    return {"plan": _plain(plan), "runs": runs, "summary": summarize(runs, plan),
            "skipped": sorted(set(plan.targets) - set(kinds))}


def measure(
    plan: Plan, target: targets.Target, secret: str, progress: Progress | None
) -> dict[str, Any]:
    """Idle, full-speed rpc and (except for `bare`) the ramp, on one fresh server."""
    base = Options("idle", target.url, secret=secret, server_pid=target.pid, warmup_s=0.0,
                   duration_s=plan.duration_s)
    out: dict[str, Any] = {
        "idle": loadgen.run(replace(base, connections=plan.idle_connections), progress),
        "rpc": loadgen.run(replace(base, scenario="rpc", connections=plan.rpc_connections,
                                   processes=plan.rpc_processes, depth=plan.rpc_depth,
                                   warmup_s=1.0), progress),
        # Enough calls in flight that the load generator is not what limits the rate.
        "capacity": loadgen.run(replace(base, scenario="rpc", connections=plan.rpc_connections,
                                        processes=plan.rpc_processes, depth=plan.capacity_depth,
                                        warmup_s=1.0), progress),
    }
    if target.kind != "bare":
        out["ramp"] = ramp(plan, replace(base, scenario="rpc", warmup_s=1.0), progress)
    return out


def ramp(plan: Plan, base: Options, progress: Progress | None) -> list[dict[str, Any]]:
    """Connections at one call/s each, growing until p99 passes the limit."""
    steps = []
    for count in plan.ramp:
        result = loadgen.run(
            replace(base, connections=count, rate=count * plan.ramp_rate_per_connection),
            progress,
        )
        steps.append(result)
        if not _holds(result, plan.ramp_p99_ms):
            break
    return steps


def _holds(result: dict[str, Any], p99_ms: float) -> bool:
    """All connected, (almost) every call answered, p99 within the limit."""
    p99 = result["latency_ms"]["p99"]
    failed = sum(result["errors"].values()) + result["unanswered"]
    return (
        result["connected"] == result["connections"]
        and p99 is not None
        and p99 <= p99_ms
        and failed <= 0.001 * max(1, result["done"])
    )


# -- the table ----------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Per target: medians of each figure; per pair: medians of same-repeat ratios."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in runs:
        by_kind.setdefault(item["target"], []).append(figures(item, plan))
    medians = {kind: _medians(values) for kind, values in by_kind.items()}
    ratios: dict[str, dict[str, float | None]] = {}
    baseline = {f["repeat"]: f for f in by_kind.get("baseline", [])}
    bare = {f["repeat"]: f for f in by_kind.get("bare", [])}
    for kind, values in by_kind.items():
        if kind in ("baseline", "bare"):
            continue
        ratios[kind] = _median_ratios(
            [(f, baseline.get(f["repeat"]), bare.get(f["repeat"])) for f in values]
        )
    return {"medians": medians, "ratios": ratios}


def figures(item: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The figures of one target in one repeat."""
    idle, rpc = item["idle"], item["rpc"]
    steps = item.get("ramp")
    held = [s["connections"] for s in steps or [] if _holds(s, plan.ramp_p99_ms)]
    return {
        "repeat": item["repeat"],
        "connected": idle["connected"],
        "connect_s": idle["connect_s"],
        "kib_per_connection": (idle["server"].get("bytes_per_connection") or 0) / KIB or None,
        "calls_per_s": rpc["per_s"],
        "p99_ms": rpc["latency_ms"]["p99"],
        "capacity_per_s": item["capacity"]["per_s"],
        "max_connections_1_per_s": (max(held) if held else 0) if steps is not None else None,
    }


def _medians(values: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in values[0] if k != "repeat"]
    return {k: _median([v[k] for v in values]) for k in keys}


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _median_ratios(
    triples: list[tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]],
) -> dict[str, float | None]:
    """Ratios against the baseline (and bare) in the same repeat; >1 favours portao."""
    get: dict[str, Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], float | None]] = {
        "memory_x_less": lambda f, b, _: _ratio(b["kib_per_connection"], f["kib_per_connection"]),
        "p99_x_lower": lambda f, b, _: _ratio(b["p99_ms"], f["p99_ms"]),
        "throughput_x": lambda f, b, _: _ratio(f["calls_per_s"], b["calls_per_s"]),
        "connections_x": lambda f, b, _: _ratio(
            f["max_connections_1_per_s"], b["max_connections_1_per_s"]),
        "pct_of_bare": lambda f, _, bare: _percent(f["capacity_per_s"], bare["capacity_per_s"]),
    }
    out: dict[str, float | None] = {}
    for name, fn in get.items():
        out[name] = _median([fn(f, b or {}, bare or {}) if _has(b, bare, name) else None
                             for f, b, bare in triples])
    return out


def _has(b: dict[str, Any] | None, bare: dict[str, Any] | None, name: str) -> bool:
    return bare is not None if name == "pct_of_bare" else b is not None


def _percent(a: float | None, b: float | None) -> float | None:
    ratio = _ratio(a, b)
    return None if ratio is None else 100 * ratio


def table(result: dict[str, Any]) -> str:
    """The before/after table with ratios, as Markdown."""
    medians = result["summary"]["medians"]
    ratios = result["summary"]["ratios"]
    plan = result["plan"]
    kinds = [k for k in ("baseline", "run", "redis", "bare") if k in medians]
    others = [k for k in kinds if k in ratios]
    header = ["aspect", *[targets.KINDS[k] for k in kinds],
              *[f"{k} vs baseline" for k in others]]

    def row(label: str, key: str, fmt: Callable[[Any], str], ratio: str | None) -> list[str]:
        cells = [fmt(medians[k][key]) if medians[k][key] is not None else "-" for k in kinds]
        extra = [_times(ratios[k].get(ratio)) if ratio else "" for k in others]
        return [label, *cells, *extra]

    idle_n = plan["idle_connections"]
    rows = [
        row(f"idle connections held (of {idle_n:,})", "connected", lambda v: f"{v:,.0f}", None),
        row("time to connect them", "connect_s", lambda v: f"{v:,.1f} s", None),
        row("memory per idle connection", "kib_per_connection", lambda v: f"{v:,.1f} KiB",
            "memory_x_less"),
        row(f"echo calls/s, {plan['rpc_connections']:,} conns full speed", "calls_per_s",
            lambda v: f"{v:,.0f}", "throughput_x"),
        row(f"p99 at {plan['rpc_connections']:,} conns full speed", "p99_ms",
            lambda v: f"{v:,.1f} ms", "p99_x_lower"),
        row(f"echo calls/s, {plan['capacity_depth']} in flight per conn", "capacity_per_s",
            lambda v: f"{v:,.0f}", None),
        row(f"most conns at 1 call/s each with p99 ≤ {plan['ramp_p99_ms']:.0f} ms",
            "max_connections_1_per_s", lambda v: f"{v:,.0f}", "connections_x"),
    ]
    if "bare" in medians:
        label = f"% of bare uvloop echo rate ({plan['capacity_depth']} in flight)"
        rows.append([label, *["" for _ in kinds],
                     *[_pct(ratios[k].get("pct_of_bare")) for k in others]])
    return report.table(rows, header)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}%"


def _plain(plan: Plan | PeerPlan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in plan.__slots__}


def _redis_up(url: str) -> bool:
    host, _, rest = url.removeprefix("redis://").partition(":")
    port = int(rest.partition("/")[0] or 6379)
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# -- the peer comparison --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerPlan:
    """python-socketio against portao's WebSocket listener, same workload."""

    targets: tuple[str, ...] = ("socketio", "run-ws", "redis-ws")
    repeats: int = 3
    idle_connections: int = 5000
    rpc_connections: int = 1000
    rpc_rate: float = 2000.0
    fanout_members: int = 1000
    duration_s: float = 5.0
    redis_url: str = "redis://127.0.0.1:6379/0"


def run_peer(plan: PeerPlan, secret: str, progress: Progress | None = None) -> dict[str, Any]:
    """Measure each target `plan.repeats` times, interleaved; ratios against socketio."""
    kinds = [k for k in plan.targets if ("redis" not in k and k != "socketio")
             or _redis_up(plan.redis_url)]
    runs: list[dict[str, Any]] = []
    for repeat in range(plan.repeats):
        for kind in kinds:
            if progress is not None:
                progress(f"peer: repeat {repeat + 1}/{plan.repeats}, {targets.KINDS[kind]}")
            with targets.started(kind, secret, plan.redis_url) as target:
                base = Options("idle", target.url, secret=secret, server_pid=target.pid,
                               duration_s=plan.duration_s, warmup_s=0.0)
                runs.append({
                    "target": kind, "repeat": repeat,
                    "idle": loadgen.run(replace(base, connections=plan.idle_connections),
                                        progress),
                    "rpc": loadgen.run(replace(base, scenario="rpc", warmup_s=1.0,
                                               connections=plan.rpc_connections,
                                               rate=plan.rpc_rate), progress),
                    "fanout": loadgen.run(replace(base, scenario="fanout", warmup_s=1.0,
                                                  connections=plan.fanout_members), progress),
                })
    figures = {k: [_peer_figures(r) for r in runs if r["target"] == k] for k in kinds}
    peer = {f["repeat"]: f for f in figures.get("socketio", [])}
    ratios = {
        kind: {
            "memory_x_less": _median([_ratio(peer.get(f["repeat"], {}).get("kib_per_connection"),
                                             f["kib_per_connection"]) for f in values]),
            "p99_x_lower": _median([_ratio(peer.get(f["repeat"], {}).get("echo_p99_ms"),
                                           f["echo_p99_ms"]) for f in values]),
            "broadcast_x": _median([_ratio(f["deliveries_per_s"],
                                           peer.get(f["repeat"], {}).get("deliveries_per_s"))
                                    for f in values]),
        }
        for kind, values in figures.items() if kind != "socketio"
    }
    return {"plan": _plain(plan), "runs": runs, "skipped": sorted(set(plan.targets) - set(kinds)),
            "summary": {"medians": {k: _medians(v) for k, v in figures.items() if v},
                        "ratios": ratios}}


def _peer_figures(item: dict[str, Any]) -> dict[str, Any]:
    idle, rpc, fanout = item["idle"], item["rpc"], item["fanout"]
    return {
        "repeat": item["repeat"],
        "kib_per_connection": (idle["server"].get("bytes_per_connection") or 0) / KIB or None,
        "echo_per_s": rpc["per_s"],
        "echo_p99_ms": rpc["latency_ms"]["p99"],
        "deliveries_per_s": fanout["per_s"],
        "delivery_p99_ms": fanout["latency_ms"]["p99"],
    }


def peer_table(result: dict[str, Any]) -> str:
    medians = result["summary"]["medians"]
    ratios = result["summary"]["ratios"]
    plan = result["plan"]
    kinds = [k for k in ("socketio", "run-ws", "redis-ws") if k in medians]
    others = [k for k in kinds if k in ratios]
    header = ["aspect", *[targets.KINDS[k] for k in kinds],
              *[f"{k} vs socketio" for k in others]]

    def row(label: str, key: str, fmt: str, ratio: str | None) -> list[str]:
        cells = ["-" if medians[k][key] is None else fmt.format(medians[k][key]) for k in kinds]
        return [label, *cells, *[_times(ratios[k][ratio]) if ratio else "" for k in others]]

    return report.table([
        row(f"memory per idle connection ({plan['idle_connections']:,})", "kib_per_connection",
            "{:,.1f} KiB", "memory_x_less"),
        row(f"echo p99 at {plan['rpc_rate']:,.0f}/s offered ({plan['rpc_connections']:,} conns)",
            "echo_p99_ms", "{:,.1f} ms", "p99_x_lower"),
        row("echo answered/s", "echo_per_s", "{:,.0f}", None),
        row(f"broadcast deliveries/s ({plan['fanout_members']:,} members)", "deliveries_per_s",
            "{:,.0f}", "broadcast_x"),
        row("broadcast delivery p99", "delivery_p99_ms", "{:,.1f} ms", None),
    ], header)
