"""The token bucket with fake times."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portao.session.ratelimit import TokenBucket

T0 = 1_800_000_000.0


def _take_all(bucket: TokenBucket, now: float) -> int:
    taken = 0
    while bucket.try_take(now):
        taken += 1
        assert taken <= 10_000
    return taken


def test_starts_full_and_empties_after_burst() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5, now=T0)
    assert _take_all(bucket, T0) == 5
    assert not bucket.try_take(T0)


def test_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5, now=T0)
    _take_all(bucket, T0)
    assert not bucket.try_take(T0 + 0.09)
    assert bucket.try_take(T0 + 0.1)
    assert not bucket.try_take(T0 + 0.1)
    assert _take_all(bucket, T0 + 0.35) == 2


def test_never_holds_more_than_burst() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5, now=T0)
    assert _take_all(bucket, T0 + 3600) == 5


def test_next_token_at() -> None:
    bucket = TokenBucket(rate_per_s=4, burst=2, now=T0)
    assert bucket.next_token_at(T0) == T0
    _take_all(bucket, T0)
    assert bucket.next_token_at(T0) == pytest.approx(T0 + 0.25)
    assert bucket.next_token_at(T0 + 0.1) == pytest.approx(T0 + 0.25)
    assert bucket.next_token_at(T0 + 1) == T0 + 1


def test_long_run_admits_burst_plus_rate_times_duration() -> None:
    bucket = TokenBucket(rate_per_s=1000, burst=2000, now=T0)
    taken = sum(_take_all(bucket, T0 + step * 0.01) for step in range(1001))
    assert taken == pytest.approx(2000 + 1000 * 10, abs=2)


def test_a_clock_jumping_back_stalls_for_one_refill_at_most() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5, now=T0)
    _take_all(bucket, T0)
    back = T0 - 3600
    assert bucket.next_token_at(back) == pytest.approx(back + 0.1)
    assert _take_all(bucket, back + 0.5) == 5


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("nan"), 1), (1, 0)])
def test_bad_parameters_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst, T0)


@given(
    rate=st.floats(0.01, 1e6),
    burst=st.integers(1, 3000),
    steps=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 50)), max_size=20),
)
def test_a_token_is_there_exactly_when_promised(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    """Sleeping until `next_token_at` never earns a second refusal, epoch-sized times."""
    bucket = TokenBucket(rate, burst, T0)
    now = T0
    for advance, takes in steps:
        now += advance
        for _ in range(takes):
            if not bucket.try_take(now):
                at = bucket.next_token_at(now)
                assert at > now
                now = at
                assert bucket.try_take(now)
        assert bucket.next_token_at(now) >= now
