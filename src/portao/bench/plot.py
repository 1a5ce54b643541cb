"""Charts for the docs: latency vs load and memory vs connections (PNG).

Both come from the ramps of a comparison: each step is N connections making one
call per second, with the server's p99 and resident memory at that step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from portao.bench.targets import KINDS

MIB = 1024 * 1024


def draw(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the charts of a comparison result; returns the files written."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    out_dir.mkdir(parents=True, exist_ok=True)
    ramps = _ramps(result)
    limit = result["plan"]["ramp_p99_ms"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, steps in ramps.items():
        points = [(s["connections"], s["latency_ms"]["p99"]) for s in steps
                  if s["latency_ms"]["p99"] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=KINDS[kind])
    ax.axhline(limit, color="grey", linestyle="--", linewidth=1, label=f"{limit:.0f} ms")
    ax.set(xscale="log", yscale="log", xlabel="connections, one call per second each",
           ylabel="p99 latency (ms)", title="Latency under load (shared 2-core machine)")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "latency_vs_load.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, steps in ramps.items():
        points = [(s["connected"], s["server"]["connected"]["rss_bytes"] / MIB) for s in steps
                  if s["server"].get("connected")]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=KINDS[kind])
    ax.set(xlabel="connections held", ylabel="server resident memory (MiB)",
           title="Memory vs connections (gateway process)")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "memory_vs_connections.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def _ramps(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The first repeat's ramp of every target that has one."""
    out: dict[str, list[dict[str, Any]]] = {}
    for item in result["runs"]:
        if item.get("ramp") and item["target"] not in out:
            out[item["target"]] = item["ramp"]
    return out
