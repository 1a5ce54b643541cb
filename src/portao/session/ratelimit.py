"""A token bucket per connection, kept as one timestamp (GCRA).

Instead of a token count refilled on every call, the bucket stores `full_at`: the
time it will hold `burst` tokens again. Taking a token moves `full_at` one interval
later; a token is there when `now >= full_at - (burst - 1) * interval`. The caller
that was refused sleeps until `next_token_at`, and `try_take` at that exact time
succeeds: both compare against the same float, so rounding never costs a second
refusal.
"""

from __future__ import annotations


class TokenBucket:
    """`burst` tokens at most, refilled at `rate_per_s`; starts full at `now`."""

    __slots__ = ("_capacity_s", "_full_at", "_interval_s", "_slack_s")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be positive, not {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self._interval_s = 1.0 / rate_per_s
        self._capacity_s = burst * self._interval_s  # time to refill an empty bucket
        self._slack_s = (burst - 1) * self._interval_s
        self._full_at = now

    def try_take(self, now: float) -> bool:
        """Take a token if one is there at `now`."""
        self._settle(now)
        if now < self._full_at - self._slack_s:
            return False
        self._full_at = max(self._full_at, now) + self._interval_s
        return True

    def is_full(self, now: float) -> bool:
        """True when the bucket holds `burst` tokens: the client stayed under the rate."""
        return now >= self._full_at

    def next_token_at(self, now: float) -> float:
        """When a token will be there: `now` itself if one is there already."""
        self._settle(now)
        return max(now, self._full_at - self._slack_s)

    def _settle(self, now: float) -> None:
        # A wall clock that jumps back would push `full_at` far ahead of `now` and
        # stall the connection for the size of the jump; never wait longer than an
        # empty bucket takes to refill.
        self._full_at = min(self._full_at, now + self._capacity_s)
