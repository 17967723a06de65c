"""Readiness verdicts (dispatcher.core.health), table-driven: every branch."""

from __future__ import annotations

import pytest

from dispatcher.core.health import Readiness, combined, process_readiness, table_readiness

W = 30.0


@pytest.mark.parametrize(
    ("phase", "since_claim", "due", "since_sample", "ready", "says"),
    [
        # A recent claim is progress, whatever is due (a claim that found nothing counts).
        ("idle", 1.0, 500, 1.0, True, "claimed 1.0s ago"),
        ("executing", W, None, None, True, "claimed 30.0s ago"),
        # No recent claim, but a fresh sample found nothing due: nothing to make progress on.
        ("draining", 120.0, 0, 2.0, True, "nothing due at the backlog sample 2.0s ago"),
        # No recent claim while rows are due: a stall (drained, blocked, saturated).
        ("claiming", 45.0, 3, 1.0, False, "3 row(s) due, last successful claim 45.0s ago"),
        ("draining", 45.0, 3, 1.0, False, "phase draining"),
        ("starting", None, 3, 1.0, False, "no successful claim yet"),
        # Nothing known: no fresh sample to say nothing is due.
        ("backoff", 45.0, 0, 31.0, False, "no backlog sample within 30s"),
        ("starting", None, None, None, False, "no successful claim yet and no backlog sample"),
        # Going away: never ready, however recent the claim.
        ("stopping", 0.1, 0, 0.1, False, "dispatcher is stopping"),
        ("stopped", 0.1, 0, 0.1, False, "dispatcher is stopped"),
    ],
)
def test_process_readiness(
    phase: str,
    since_claim: float | None,
    due: int | None,
    since_sample: float | None,
    ready: bool,
    says: str,
) -> None:
    verdict = process_readiness(
        phase=phase, since_claim=since_claim, due=due, since_sample=since_sample, window=W
    )
    assert verdict.ready is ready
    assert says in verdict.reason


def test_combined_needs_every_dispatcher_ready() -> None:
    up, down = Readiness(True, "claimed 0.1s ago"), Readiness(False, "3 row(s) due")
    assert combined([up, up]).ready
    assert combined([up, down]) == Readiness(False, "3 row(s) due")
    assert combined([]) == Readiness(False, "no dispatcher is watched")


@pytest.mark.parametrize(
    ("claimable", "oldest", "ready", "says"),
    [
        (0, None, True, "no claimable row is due"),
        (2, 29.5, True, "2 claimable row(s) due, the oldest for 29.5s"),
        (2, 31.0, False, "(window 30s): no dispatcher claimed them"),
    ],
)
def test_table_readiness(claimable: int, oldest: float | None, ready: bool, says: str) -> None:
    verdict = table_readiness(claimable=claimable, oldest_claimable=oldest, window=W)
    assert verdict.ready is ready
    assert says in verdict.reason
