"""Results as JSON files and as tables a person reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KIB = 1024


def write_json(result: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:,.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def describe(result: dict[str, Any]) -> str:
    """One scenario result as a two-column table."""
    latency = result["latency_ms"]
    server = result["server"]
    rows: list[tuple[str, object]] = [
        ("target", result["target"]),
        ("connections", f"{result['connected']:,} of {result['connections']:,}"),
        ("load processes", result["processes"]),
        ("connect time", f"{result['connect_s']:.2f} s"),
    ]
    rows += _scenario_rows(result)
    rows += [
        ("latency p50 / p99 / p99.9", _latency(latency)),
        ("latency max", _ms(latency["max"])),
    ]
    if server.get("connected"):
        rows.append(("server RSS", f"{server['connected']['rss_bytes'] / KIB / KIB:,.1f} MiB"))
        rows.append(("server open files / threads",
                     f"{server['connected']['fds']:,} / {server['connected']['threads']:,}"))
    if "bytes_per_connection" in server:
        rows.append(("server memory per connection",
                     f"{server['bytes_per_connection'] / KIB:,.2f} KiB"))
    for key in ("connect_errors", "errors", "closed_by"):
        if result[key]:
            rows.append((key.replace("_", " "), _counts(result[key])))
    if result["unanswered"]:
        rows.append(("unanswered", result["unanswered"]))
    note = f"load average {result['machine']['load_avg_1m']} at start; {result['machine']['note']}"
    return f"{result['scenario']}\n" + table(rows, ["", ""]) + "\n" + note


def _scenario_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    match result["scenario"]:
        case "rpc":
            mode = (f"open loop at {result['offered_per_s']:,.0f}/s" if result["mode"] == "open"
                    else f"closed loop, {result['depth']} in flight per connection")
            return [("mode", mode), ("calls/s", result["per_s"])]
        case "fanout":
            return [("messages", result["messages"]), ("deliveries/s", result["per_s"])]
        case "churn":
            return [("connect+auth+close /s", result["per_s"])]
        case _:
            return [("pings answered", f"{result['done']:,} of {result['connected']:,}")]


def _latency(latency: dict[str, Any]) -> str:
    return " / ".join(_ms(latency[k]) for k in ("p50", "p99", "p999"))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f} ms"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items()))
