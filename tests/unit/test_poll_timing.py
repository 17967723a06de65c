"""When the poller claims next: every poll interval, and half a notify interval apart for
two notify intervals after a wake-up hint (dispatcher.runtime.poller.next_claim_in)."""

from __future__ import annotations

import math

import pytest

from dispatcher.emit import DEFAULT_NOTIFY_INTERVAL
from dispatcher.runtime.poller import LINGER_POLL, NOTIFY_LINGER, next_claim_in

POLL = 0.1


def test_ticks_start_one_poll_interval_apart_whatever_the_claim_took() -> None:
    assert next_claim_in(elapsed=0.0, since_hint=10.0, poll_interval=POLL) == pytest.approx(POLL)
    assert next_claim_in(elapsed=0.03, since_hint=10.0, poll_interval=POLL) == pytest.approx(0.07)
    # A claim longer than the interval: the next one starts at once, never "before now".
    assert next_claim_in(elapsed=0.25, since_hint=10.0, poll_interval=POLL) == 0.0


def test_after_a_hint_claims_start_half_a_notify_interval_apart() -> None:
    # A producer folds the hints of commits within one notify interval of its last hint:
    # the rows behind a folded hint are found within half an interval.
    assert math.isclose(LINGER_POLL, DEFAULT_NOTIFY_INTERVAL / 2)
    wait = next_claim_in(elapsed=0.0002, since_hint=0.0002, poll_interval=POLL)
    # Counted from when the claim began, not from when it ended.
    assert wait == pytest.approx(LINGER_POLL - 0.0002)
    assert next_claim_in(elapsed=0.003, since_hint=0.003, poll_interval=POLL) == 0.0


def test_lingering_ends_two_notify_intervals_after_the_hint() -> None:
    # Long enough for a late commit and the hint's own delivery; no longer, so a latest-state
    # key's next row (due when its delivery settles) waits for the next tick rather than
    # being taken by a linger poll after its own emit's hint (docs/embedding.md).
    assert math.isclose(NOTIFY_LINGER, 2 * DEFAULT_NOTIFY_INTERVAL)
    inside = next_claim_in(elapsed=0.0, since_hint=NOTIFY_LINGER * 0.99, poll_interval=POLL)
    assert inside == pytest.approx(LINGER_POLL)
    after = next_claim_in(elapsed=0.0, since_hint=NOTIFY_LINGER, poll_interval=POLL)
    assert after == pytest.approx(POLL)


def test_a_poll_interval_shorter_than_the_linger_poll_wins() -> None:
    assert next_claim_in(elapsed=0.0, since_hint=0.0, poll_interval=0.0005) == pytest.approx(0.0005)
