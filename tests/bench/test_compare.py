"""The comparison: same-repeat ratios and medians, the table, the charts, one tiny run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

pytest.importorskip("hdrh", reason="needs the bench extra: pip install -e '.[bench]'")
pytest.importorskip("matplotlib", reason="needs the bench extra: pip install -e '.[bench]'")

from portao.bench import compare, loadgen, plot, targets
from portao.session.auth import generate_secret


def scenario(connected: int, per_s: float, p99: float | None, kib: float | None = None,
             connections: int | None = None) -> dict[str, Any]:
    server: dict[str, Any] = {"connected": {"rss_bytes": 50 << 20, "fds": 10, "threads": 1}}
    if kib is not None:
        server["bytes_per_connection"] = kib * 1024
    return {"connections": connections or connected, "connected": connected, "connect_s": 1.0,
            "per_s": per_s, "done": int(per_s), "errors": {}, "unanswered": 0,
            "latency_ms": {"p99": p99}, "server": server}


def run_of(kind: str, repeat: int, *, kib: float, calls: float, p99: float,
           ramp: list[tuple[int, float]] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"target": kind, "repeat": repeat,
                           "idle": scenario(100, 0, 1.0, kib), "rpc": scenario(1000, calls, p99),
                           "capacity": scenario(1000, 2 * calls, 10 * p99)}
    if ramp is not None:
        out["ramp"] = [scenario(n, n, p) for n, p in ramp]
    return out


def test_ratios_are_taken_within_a_repeat_then_medianed() -> None:
    plan = compare.Plan()
    runs = [
        run_of("baseline", 0, kib=30, calls=1000, p99=200, ramp=[(1000, 50), (2000, 150)]),
        run_of("run", 0, kib=3, calls=10_000, p99=20, ramp=[(1000, 5), (2000, 6), (4000, 500)]),
        run_of("bare", 0, kib=1, calls=20_000, p99=5, ramp=None),
        run_of("baseline", 1, kib=60, calls=500, p99=400, ramp=[(1000, 500)]),
        run_of("run", 1, kib=3, calls=10_000, p99=20, ramp=[(1000, 5), (2000, 500)]),
        run_of("bare", 1, kib=1, calls=40_000, p99=5, ramp=None),
    ]
    summary = compare.summarize(runs, plan)
    assert summary["medians"]["baseline"]["kib_per_connection"] == 45
    assert summary["medians"]["run"]["max_connections_1_per_s"] == 1500  # median of 2000, 1000
    ratios = summary["ratios"]["run"]
    assert ratios["memory_x_less"] == 15  # median of 10 and 20
    assert ratios["throughput_x"] == 15  # median of 10 and 20
    assert ratios["pct_of_bare"] == 37.5  # median of 50% and 25%
    # repeat 1: the baseline held nothing, so no ratio; repeat 0: 2000 / 1000
    assert ratios["connections_x"] == 2
    table = compare.table({"plan": compare._plain(plan), "summary": summary})
    assert "thread per client" in table
    assert "% of bare uvloop echo rate (8 in flight)" in table
    assert "15.0x" in table


@pytest.mark.slow
def test_a_tiny_comparison_runs_end_to_end(tmp_path: Path) -> None:
    plan = compare.Plan(targets=("bare", "baseline", "run"), repeats=1, idle_connections=20,
                        rpc_connections=20, rpc_processes=1, duration_s=0.5, ramp=(20, 40))
    result = compare.run(plan, generate_secret())
    kinds = {run["target"] for run in result["runs"]}
    assert kinds == {"bare", "baseline", "run"}
    for run in result["runs"]:
        assert run["idle"]["connected"] == 20
        assert run["rpc"]["done"] > 0
    assert result["summary"]["ratios"]["run"]["pct_of_bare"] is not None
    assert "portao run (memory)" in compare.table(result)
    written = plot.draw(result, tmp_path)
    assert [p.name for p in written] == ["latency_vs_load.png", "memory_vs_connections.png"]
    assert all(p.stat().st_size > 1000 for p in written)


@pytest.mark.slow
def test_the_socketio_peer_speaks_the_same_workload(redis_url: str) -> None:
    pytest.importorskip("socketio", reason="needs the bench extra: pip install -e '.[bench]'")
    secret = generate_secret()
    with targets.started("socketio", secret, redis_url) as target:
        options = loadgen.Options("fanout", target.url, connections=10, processes=1,
                                  duration_s=0.5, warmup_s=0.2, rate=20.0, secret=secret)
        fanout = loadgen.run(options)
        rpc = loadgen.run(replace(options, scenario="rpc", rate=0.0))
        idle = loadgen.run(replace(options, scenario="idle"))
    assert 10 <= fanout["deliveries"] <= 10 * fanout["messages"]
    assert rpc["done"] > 0
    assert rpc["errors"] == {}
    assert idle["done"] == 10


@pytest.mark.slow
def test_a_redis_target_answers_then_leaves_no_keys(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter(match="bench*", count=1000))
    secret = generate_secret()
    with targets.started("redis", secret, redis_url) as target:
        options = loadgen.Options("rpc", target.url, connections=5, processes=1,
                                  duration_s=0.3, warmup_s=0.1, secret=secret)
        rpc = loadgen.run(options)
        assert set(client.scan_iter(match="bench*", count=1000)) - before  # it used Redis
    assert rpc["done"] > 0
    assert set(client.scan_iter(match="bench*", count=1000)) - before == set()
    client.close()
