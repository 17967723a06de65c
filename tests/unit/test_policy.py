from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import MAX_DELAY_SECONDS, BackoffKind, RetryPolicy, clamp_delay
from dispatcher.core.policy import backoff_delay

PROPERTY = settings(database=None, deadline=None, max_examples=300)


class FixedRandom:
    """Returns the same u every time, and counts how often it was asked."""

    def __init__(self, u: float) -> None:
        self.u = u
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.u


EXPONENTIAL = RetryPolicy(
    kind=BackoffKind.EXPONENTIAL, base_delay=1.0, factor=2.0, max_delay=300.0, jitter=0.5
)
LINEAR = RetryPolicy(
    kind=BackoffKind.LINEAR, base_delay=2.0, factor=0.5, max_delay=300.0, jitter=0.5
)
CONSTANT = RetryPolicy(
    kind=BackoffKind.CONSTANT, base_delay=3.0, factor=7.0, max_delay=10.0, jitter=0.5
)


# Jitter 0.5 spreads every delay over [0.5 d, 1.5 d]: u = 0 gives the low end, 0.5 the delay
# itself, 1 the high end; all values are exact binary fractions.
@pytest.mark.parametrize(
    ("policy", "attempt", "u", "expected"),
    [
        # exponential: 1 * 2 ** (attempt - 1)
        (EXPONENTIAL, 1, 0.0, 0.5),
        (EXPONENTIAL, 1, 0.5, 1.0),
        (EXPONENTIAL, 1, 1.0, 1.5),
        (EXPONENTIAL, 2, 0.5, 2.0),
        (EXPONENTIAL, 3, 0.0, 2.0),
        (EXPONENTIAL, 3, 0.5, 4.0),
        (EXPONENTIAL, 3, 1.0, 6.0),
        (EXPONENTIAL, 9, 0.0, 128.0),
        (EXPONENTIAL, 9, 0.5, 256.0),
        (EXPONENTIAL, 9, 1.0, 300.0),  # 384 capped
        (EXPONENTIAL, 10, 0.0, 256.0),
        (EXPONENTIAL, 10, 0.5, 300.0),  # 512 capped
        # linear: 2 * (1 + 0.5 * (attempt - 1))
        (LINEAR, 1, 0.0, 1.0),
        (LINEAR, 1, 0.5, 2.0),
        (LINEAR, 1, 1.0, 3.0),
        (LINEAR, 3, 0.0, 2.0),
        (LINEAR, 3, 0.5, 4.0),
        (LINEAR, 3, 1.0, 6.0),
        (LINEAR, 5, 0.0, 3.0),
        (LINEAR, 5, 0.5, 6.0),
        (LINEAR, 5, 1.0, 9.0),
        (LINEAR, 1000, 0.0, 300.0),  # 1001 * 0.5 capped
        # constant: 3 whatever the attempt; the factor is ignored
        (CONSTANT, 1, 0.0, 1.5),
        (CONSTANT, 1, 0.5, 3.0),
        (CONSTANT, 1, 1.0, 4.5),
        (CONSTANT, 50, 0.0, 1.5),
        (CONSTANT, 50, 0.5, 3.0),
        (CONSTANT, 50, 1.0, 4.5),
    ],
)
def test_backoff_exact_values_with_fixed_u(
    policy: RetryPolicy, attempt: int, u: float, expected: float
) -> None:
    assert backoff_delay(policy, attempt, FixedRandom(u)) == expected


def test_backoff_with_seeded_random_is_reproducible() -> None:
    policy = RetryPolicy(base_delay=1.0, factor=2.0, max_delay=300.0, jitter=0.1)
    rng = random.Random(42)
    # random.Random(42) yields 0.6394267984578837, 0.025010755222666936, 0.27502931836911926;
    # each delay is 2 ** (attempt - 1) * (1 + 0.1 * (2u - 1)).
    delays = [backoff_delay(policy, attempt, rng) for attempt in (1, 2, 3)]
    assert delays == pytest.approx(
        [1.02788535969157674, 1.8100043020890668, 3.8200234546952954], rel=1e-12
    )
    again = random.Random(42)
    assert [backoff_delay(policy, attempt, again) for attempt in (1, 2, 3)] == delays


def test_zero_jitter_ignores_u() -> None:
    policy = RetryPolicy(base_delay=1.5, factor=2.0, max_delay=100.0, jitter=0.0)
    assert {backoff_delay(policy, 3, FixedRandom(u)) for u in (0.0, 0.3, 1.0)} == {6.0}


def test_full_jitter_reaches_zero_and_double() -> None:
    policy = RetryPolicy(base_delay=4.0, factor=2.0, max_delay=100.0, jitter=1.0)
    assert backoff_delay(policy, 2, FixedRandom(0.0)) == 0.0
    assert backoff_delay(policy, 2, FixedRandom(1.0)) == 16.0


def test_zero_base_delay_is_always_zero() -> None:
    for kind in BackoffKind:
        policy = RetryPolicy(kind=kind, base_delay=0.0, factor=3.0, max_delay=5.0, jitter=1.0)
        assert backoff_delay(policy, 10**400, FixedRandom(1.0)) == 0.0


def test_exponential_factor_one_stays_at_base() -> None:
    policy = RetryPolicy(base_delay=2.0, factor=1.0, max_delay=50.0, jitter=0.0)
    assert backoff_delay(policy, 10**400, FixedRandom(0.5)) == 2.0


def test_draws_exactly_one_number_per_call() -> None:
    rng = FixedRandom(0.5)
    for kind in BackoffKind:
        backoff_delay(RetryPolicy(kind=kind, jitter=0.0), 3, rng)
    assert rng.calls == len(BackoffKind)


@pytest.mark.parametrize("kind", list(BackoffKind))
@pytest.mark.parametrize("attempt", [10_000, 2**64, 10**400])
def test_huge_attempt_numbers_cap_without_overflow(kind: BackoffKind, attempt: int) -> None:
    policy = RetryPolicy(kind=kind, base_delay=1.0, factor=3.0, max_delay=60.0, jitter=0.5)
    expected = 1.5 if kind is BackoffKind.CONSTANT else 60.0
    assert backoff_delay(policy, attempt, FixedRandom(1.0)) == expected
    # Even the low end of the jitter range of an enormous delay is past the cap.
    expected_low = 0.5 if kind is BackoffKind.CONSTANT else 60.0
    assert backoff_delay(policy, attempt, FixedRandom(0.0)) == expected_low


def test_huge_linear_factor_does_not_overflow() -> None:
    policy = RetryPolicy(kind=BackoffKind.LINEAR, base_delay=1e300, factor=1e300, max_delay=1e308)
    assert backoff_delay(policy, 10**400, FixedRandom(0.5)) == MAX_DELAY_SECONDS


@pytest.mark.parametrize("field", ["base_delay", "max_delay", "max_event_age"])
def test_delays_past_what_a_timestamp_holds_are_clamped(field: str) -> None:
    # 1e13 s added to now() overflows a Postgres timestamp: such a row would fail the
    # whole settlement batch it is part of.
    policy = RetryPolicy(**{field: 1e13, "max_delay": 1e13})
    assert getattr(policy, field) == MAX_DELAY_SECONDS
    assert policy.max_delay == MAX_DELAY_SECONDS


def test_clamp_delay_bounds_every_float() -> None:
    assert clamp_delay(-5.0) == 0.0
    assert clamp_delay(math.nan) == MAX_DELAY_SECONDS
    assert clamp_delay(math.inf) == MAX_DELAY_SECONDS
    assert clamp_delay(12.5) == 12.5


def test_exponential_near_one_factor_grows_slowly_for_huge_attempts() -> None:
    # A cap on the attempt number alone would be wrong for factors this close to 1.
    policy = RetryPolicy(base_delay=1.0, factor=1.000001, max_delay=1e9, jitter=0.0)
    assert backoff_delay(policy, 1_000_001, FixedRandom(0.5)) == pytest.approx(math.e, rel=1e-5)


def test_tiny_base_with_huge_factor_does_not_overflow() -> None:
    # factor ** 39 alone is 1e390, beyond a float, although the delay is 1e90.
    policy = RetryPolicy(base_delay=1e-300, factor=1e10, max_delay=1e100, jitter=0.0)
    assert backoff_delay(policy, 40, FixedRandom(0.5)) == MAX_DELAY_SECONDS
    assert backoff_delay(policy, 31, FixedRandom(0.5)) == pytest.approx(1.0, rel=1e-9)
    assert backoff_delay(policy, 10_000, FixedRandom(0.5)) == MAX_DELAY_SECONDS


@pytest.mark.parametrize("attempt", [0, -1, -(10**400)])
def test_attempt_below_one_is_rejected(attempt: int) -> None:
    with pytest.raises(InvalidInput, match="attempt"):
        backoff_delay(EXPONENTIAL, attempt, FixedRandom(0.5))


@pytest.mark.parametrize("attempt", [True, 1.0, "1", None])
def test_attempt_must_be_an_integer(attempt: Any) -> None:
    with pytest.raises(InvalidInput, match="must be an integer"):
        backoff_delay(EXPONENTIAL, attempt, FixedRandom(0.5))


@pytest.mark.parametrize("u", [-0.1, 1.5, math.nan, math.inf])
def test_random_source_out_of_range_is_rejected(u: float) -> None:
    with pytest.raises(InvalidInput, match=r"rng\.random\(\)"):
        backoff_delay(EXPONENTIAL, 1, FixedRandom(u))


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    kind = draw(st.sampled_from(BackoffKind))
    base = draw(st.floats(0.0, 1e6))
    low_factor = 1.0 if kind is BackoffKind.EXPONENTIAL else 0.0
    factor = draw(st.floats(low_factor, 1e6))
    max_delay = draw(st.floats(base, 1e12))
    jitter = draw(st.floats(0.0, 1.0))
    return RetryPolicy(
        kind=kind, base_delay=base, factor=factor, max_delay=max_delay, jitter=jitter
    )


attempts = st.one_of(st.integers(1, 100), st.integers(1, 10**500))
units = st.floats(0.0, 1.0)


@PROPERTY
@given(policy=policies(), attempt=attempts, u=units)
def test_delay_is_always_within_zero_and_max_delay(
    policy: RetryPolicy, attempt: int, u: float
) -> None:
    delay = backoff_delay(policy, attempt, FixedRandom(u))
    assert math.isfinite(delay)
    assert 0.0 <= delay <= policy.max_delay


@PROPERTY
@given(policy=policies(), attempt=attempts, u=units)
def test_jitter_stays_within_its_ratio_of_the_plain_delay(
    policy: RetryPolicy, attempt: int, u: float
) -> None:
    plain = backoff_delay(policy, attempt, FixedRandom(0.5))
    delay = backoff_delay(policy, attempt, FixedRandom(u))
    low = plain * (1 - policy.jitter)
    high = min(plain * (1 + policy.jitter), policy.max_delay)
    slack = 1e-9 * max(plain, 1.0)
    if plain < policy.max_delay:
        assert low - slack <= delay <= high + slack
    else:
        # The plain delay was capped: the true one may be larger, so only the cap binds above.
        assert low - slack <= delay <= policy.max_delay


@PROPERTY
@given(policy=policies(), attempt=st.integers(1, 10_000), u=units)
def test_delay_never_decreases_with_more_failures(
    policy: RetryPolicy, attempt: int, u: float
) -> None:
    now = backoff_delay(policy, attempt, FixedRandom(u))
    later = backoff_delay(policy, attempt + 1, FixedRandom(u))
    assert later >= now * (1 - 1e-12)


@PROPERTY
@given(policy=policies(), attempt=attempts, seed=st.integers(0, 2**32))
def test_seeded_random_is_deterministic(policy: RetryPolicy, attempt: int, seed: int) -> None:
    first = backoff_delay(policy, attempt, random.Random(seed))
    assert backoff_delay(policy, attempt, random.Random(seed)) == first
