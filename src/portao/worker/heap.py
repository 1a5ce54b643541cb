"""The garbage-collector policy of a running gateway or worker.

Every message allocates a few short-lived containers (futures, envelopes, tuples);
with CPython's default thresholds the collector scans the young generation every
700 of them and, every hundred young scans, the whole heap: the imported modules
and every connection's objects. Under load that was 6-14 % of a process's CPU. So,
once started, what the process holds then (modules, settings, broker links) is
frozen out of the scans, and the young generation is scanned less often. Cycles
are still collected; what reference counting frees (nearly everything) never
waited for the collector. `release_heap` undoes the freeze when the gateway or
worker stops, so frozen objects that became garbage are collected after all.
"""

from __future__ import annotations

import gc

#: Container allocations (net) between scans of the young generation (default 700).
YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """After start-up: freeze what exists now, and make young scans rarer."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def release_heap() -> None:
    """At stop: let the collector scan (and free) the frozen objects again."""
    gc.unfreeze()
