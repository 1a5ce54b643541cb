"""Latency samples: cheap to record in the hot loop, merged into an HDR histogram.

Recording appends microseconds to an array (tens of nanoseconds); the HDR
histogram (1 µs .. 10 min, 3 significant digits) is built once at the end of a
run, from value counts, and travels between processes in its compact encoding.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped,import-not-found,unused-ignore]

LOWEST_US = 1
HIGHEST_US = 600_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


class Samples:
    """Latencies of one process, in microseconds."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values = array("q")

    def record(self, seconds: float) -> None:
        self._values.append(max(LOWEST_US, int(seconds * 1_000_000)))

    def __len__(self) -> int:
        return len(self._values)

    def histogram(self) -> HdrHistogram:
        out = new_histogram()
        for value, count in Counter(self._values).items():
            out.record_value(min(value, HIGHEST_US), count)
        return out

    def encoded(self) -> bytes:
        """The histogram in HDR's compressed base64 form (for the parent process)."""
        encoded: bytes = self.histogram().encode()
        return encoded


def merge(encoded: list[bytes]) -> HdrHistogram:
    """One histogram from the encoded histograms of every process."""
    total = new_histogram()
    for item in encoded:
        total.add(HdrHistogram.decode(item))
    return total


def summary_ms(histogram: HdrHistogram) -> dict[str, Any]:
    """Percentiles, mean and max in milliseconds (None when nothing was recorded)."""
    count = histogram.get_total_count()
    out: dict[str, Any] = {"count": count}
    if not count:
        return out | {name: None for name in [*PERCENTILES, "mean", "max"]}
    for name, percentile in PERCENTILES.items():
        out[name] = histogram.get_value_at_percentile(percentile) / 1000
    out["mean"] = round(histogram.get_mean_value() / 1000, 3)
    out["max"] = histogram.get_max_value() / 1000
    return out
