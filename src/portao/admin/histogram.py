"""A latency histogram cheap enough for the hot path.

`observe` is one bisect and two additions, with no lock and no label lookup: the
gateway and the worker record every call and handler with it, and the metrics
collector turns the counts into a Prometheus histogram only when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

#: Upper bounds in seconds: sub-millisecond loopback calls up to the default call timeout.
BOUNDS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


@dataclass(slots=True)
class LatencyHistogram:
    """Counts of observations per bucket (`le` semantics), their sum and number."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_S) + 1))  # last: +Inf
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS_S, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(`le` label, observations at or below it), ending with `+Inf`."""
        out = []
        total = 0
        for bound, count in zip((*map(str, BOUNDS_S), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out
