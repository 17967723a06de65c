"""What feeds a circuit breaker, decided purely: every failure kind and every outcome type
has a row here, so a new one fails these tests until it is given a decision."""

from __future__ import annotations

import uuid
from typing import Literal, get_args

import pytest

from dispatcher.core.breakers import (
    BREAKER_KINDS,
    BreakerEffect,
    LocalBreakers,
    breaker_effect,
    is_breaker_kind,
    rate_limit_holds,
    trailing_failures,
)
from dispatcher.core.models import RetryPolicy
from dispatcher.core.outcomes import (
    ClaimedRow,
    Complete,
    DeadLetter,
    DeadLetterReason,
    ErrorRecord,
    Failure,
    FailureKind,
    Outcome,
    Park,
    Release,
    Reply,
    Reschedule,
    Resolution,
    ResolveDeadLetter,
    Retry,
    SkipDepth,
    Success,
)

Shape = Literal["async", "sync", "handler"]

RESET: BreakerEffect = "reset"
FAILURE: BreakerEffect = "failure"
NONE: BreakerEffect = "none"

# Does a failure of this kind say the target is unhealthy?
KIND_COUNTS: dict[FailureKind, bool] = {
    FailureKind.HANDLER_ERROR: True,
    FailureKind.TIMEOUT: True,
    FailureKind.TARGET_NOT_FOUND: True,
    FailureKind.PERMISSION_DENIED: True,
    FailureKind.RATE_LIMITED: False,
    FailureKind.GATE_SATURATED: False,
    FailureKind.PERMANENT: False,
    FailureKind.UNAVAILABLE: False,
}


def make_row(shape: Shape = "async", *, row_id: int = 1, trigger_id: int = 3) -> ClaimedRow:
    return ClaimedRow(
        id=row_id,
        lease_token=uuid.UUID(int=row_id),
        event_id=uuid.UUID(int=1000 + row_id),
        trigger_id=trigger_id,
        scope="acme",
        trigger_name=f"trigger-{trigger_id}",
        target="hook",
        registered_by="alice",
        payload={"key": "users/42"},
        attempts=0,
        orphans=0,
        depth=0,
        reply_to="inbox-1" if shape == "sync" else None,
        dead_letter_id=77 if shape == "handler" else None,
        policy=RetryPolicy(),
        timeout=5.0,
        age=1.0,
    )


def err(kind: FailureKind) -> ErrorRecord:
    return ErrorRecord(attempt=1, kind=kind, message="boom")


def _effect(kind: FailureKind) -> BreakerEffect:
    return FAILURE if KIND_COUNTS[kind] else NONE


def _failing(kind: FailureKind) -> list[tuple[str, Outcome, BreakerEffect]]:
    """Every outcome carrying a failure of ``kind``, with its effect on an async row."""
    return [
        (f"retry-{kind}", Retry(1.0, 1, err(kind)), _effect(kind)),
        (f"park-{kind}", Park(kind, err(kind)), _effect(kind)),
        (
            f"dead-letter-{kind}",
            DeadLetter(DeadLetterReason.PERMANENT, 1, err(kind)),
            _effect(kind),
        ),
        # A reschedule uses no attempt: never the target's fault, whatever its error says.
        (f"reschedule-{kind}", Reschedule(0.5, kind, err(kind)), NONE),
        (f"reply-{kind}", Reply(Failure(kind, "boom"), 500), NONE),
    ]


# Every outcome type, with what it does to an async row's trigger.
ASYNC_CASES: list[tuple[str, Outcome, BreakerEffect]] = [
    ("complete", Complete(), RESET),
    ("skip-depth", SkipDepth(9, 8), NONE),
    ("release", Release(), NONE),
    ("reschedule-no-error", Reschedule(0.05, FailureKind.GATE_SATURATED), NONE),
    ("dead-letter-expired", DeadLetter(DeadLetterReason.EXPIRED, 2, None), NONE),
    ("dead-letter-lease-expired", DeadLetter(DeadLetterReason.LEASE_EXPIRED, 5, None), NONE),
    ("reply-success", Reply(Success({"ok": True}), 200), NONE),
    ("resolve-handled", ResolveDeadLetter(77, Resolution.HANDLED, None), NONE),
    ("resolve-failed", ResolveDeadLetter(77, Resolution.HANDLER_FAILED, "timeout: slow"), NONE),
    *(case for kind in FailureKind for case in _failing(kind)),
]


def test_every_failure_kind_is_decided() -> None:
    assert set(KIND_COUNTS) == set(FailureKind)


def test_every_outcome_type_is_decided() -> None:
    assert {type(outcome) for _, outcome, _ in ASYNC_CASES} == set(get_args(Outcome))
    assert {effect for *_, effect in ASYNC_CASES} == set(get_args(BreakerEffect))


@pytest.mark.parametrize(("kind", "counts"), KIND_COUNTS.items(), ids=str)
def test_is_breaker_kind(kind: FailureKind, counts: bool) -> None:
    assert is_breaker_kind(kind) is counts
    assert (kind in BREAKER_KINDS) is counts


@pytest.mark.parametrize(
    ("outcome", "effect"), [c[1:] for c in ASYNC_CASES], ids=[c[0] for c in ASYNC_CASES]
)
def test_breaker_effect_async(outcome: Outcome, effect: BreakerEffect) -> None:
    assert breaker_effect(make_row(), outcome) == effect


@pytest.mark.parametrize("shape", ["sync", "handler"])
@pytest.mark.parametrize("outcome", [c[1] for c in ASYNC_CASES], ids=[c[0] for c in ASYNC_CASES])
def test_only_async_rows_feed_breakers(shape: Shape, outcome: Outcome) -> None:
    assert breaker_effect(make_row(shape), outcome) == NONE


HE = Retry(1.0, 1, err(FailureKind.HANDLER_ERROR))
TO_DEAD = DeadLetter(DeadLetterReason.TIMEOUT, 3, err(FailureKind.TIMEOUT))
NF_PARK = Park(FailureKind.TARGET_NOT_FOUND, err(FailureKind.TARGET_NOT_FOUND))
RATE = Reschedule(2.0, FailureKind.RATE_LIMITED, err(FailureKind.RATE_LIMITED))
PERM = DeadLetter(DeadLetterReason.PERMANENT, 1, err(FailureKind.PERMANENT))
OK = Complete()

# (trigger_id, outcome, applied, shape) in completion order -> trailing failures per trigger.
Step = tuple[int, Outcome, bool, Shape]
TRAILING_CASES: list[tuple[str, list[Step], dict[int, int]]] = [
    ("empty", [], {}),
    ("failures-add-up", [(3, HE, True, "async")] * 3, {3: 3}),
    (
        "every-counted-kind",
        [(3, HE, True, "async"), (3, TO_DEAD, True, "async"), (3, NF_PARK, True, "async")],
        {3: 3},
    ),
    (
        "success-resets",
        [(3, HE, True, "async"), (3, OK, True, "async"), (3, HE, True, "async")],
        {3: 1},
    ),
    ("success-last-leaves-nothing", [(3, HE, True, "async"), (3, OK, True, "async")], {}),
    (
        "stale-success-does-not-reset",
        [(3, HE, True, "async"), (3, OK, False, "async"), (3, HE, True, "async")],
        {3: 2},
    ),
    ("stale-failure-not-counted", [(3, HE, False, "async"), (3, HE, True, "async")], {3: 1}),
    (
        "uncounted-outcomes-neither-add-nor-reset",
        [
            (3, HE, True, "async"),
            (3, RATE, True, "async"),
            (3, PERM, True, "async"),
            (3, Release(), True, "async"),
            (3, SkipDepth(9, 8), True, "async"),
            (3, HE, True, "async"),
        ],
        {3: 2},
    ),
    (
        "triggers-counted-apart",
        [
            (3, HE, True, "async"),
            (4, HE, True, "async"),
            (3, OK, True, "async"),
            (4, HE, True, "async"),
            (5, OK, True, "async"),
        ],
        {4: 2},
    ),
    (
        "sync-and-handler-rows-ignored",
        [
            (3, HE, True, "async"),
            (3, OK, True, "sync"),
            (3, HE, True, "handler"),
            (3, HE, True, "sync"),
        ],
        {3: 1},
    ),
]


@pytest.mark.parametrize(
    ("steps", "expected"), [c[1:] for c in TRAILING_CASES], ids=[c[0] for c in TRAILING_CASES]
)
def test_trailing_failures(steps: list[Step], expected: dict[int, int]) -> None:
    settled = [
        (make_row(shape, row_id=i, trigger_id=trigger_id), outcome, applied)
        for i, (trigger_id, outcome, applied, shape) in enumerate(steps, start=1)
    ]
    assert trailing_failures(settled) == expected


def test_rate_limit_holds_take_the_longest_retry_after_per_trigger() -> None:
    settled = [
        (make_row(row_id=1, trigger_id=3), Reschedule(2.0, FailureKind.RATE_LIMITED), True),
        (make_row(row_id=2, trigger_id=3), Reschedule(5.0, FailureKind.RATE_LIMITED), True),
        (make_row(row_id=3, trigger_id=3), Reschedule(9.0, FailureKind.RATE_LIMITED), False),
        (make_row(row_id=4, trigger_id=4), Reschedule(7.0, FailureKind.GATE_SATURATED), True),
        (make_row(row_id=5, trigger_id=5), HE, True),
    ]
    assert rate_limit_holds(settled) == {3: 5.0}


# --- The process-local view (LocalBreakers) ---

THRESHOLD = 3
FULL = 400
HOLD = 0.1


def view() -> LocalBreakers:
    return LocalBreakers(threshold=THRESHOLD, full=FULL, hold_delay=HOLD)


def test_local_view_holds_a_trigger_at_the_threshold_until_its_failures_are_settled() -> None:
    v = view()
    row = make_row(trigger_id=3)
    for seq in (1, 2):
        v.observe(row, HE, seq=seq, now=0.0)
        assert v.wait(3, now=0.0, applied=0) is None  # below the threshold: cautious only
    assert v.held(now=0.0, applied=0) == []
    v.observe(row, HE, seq=3, now=0.0)
    assert v.wait(3, now=0.0, applied=0) == HOLD
    assert v.held(now=0.0, applied=2) == [3]  # the tripping failure is not written yet
    v.observe(row, TO_DEAD, seq=4, now=0.0)  # one more: held until that one is written too
    assert v.held(now=0.0, applied=3) == [3]
    # Written: the shared breaker decides now. Still cautious: one row at a time.
    assert v.held(now=0.0, applied=4) == []
    assert v.wait(3, now=0.0, applied=4) is None
    v.started(3)
    assert v.wait(3, now=0.0, applied=4) == 0.0
    assert v.held(now=0.0, applied=4) == [3]
    v.ended(3)
    assert v.wait(3, now=0.0, applied=4) is None
    assert v.wait(4, now=0.0, applied=0) is None  # other triggers are not concerned


def test_local_view_window_halves_on_failures_and_doubles_back_on_successes() -> None:
    v = view()
    row = make_row(trigger_id=3)
    v.observe(row, HE, seq=1, now=0.0)  # window 200
    for _ in range(200):
        v.started(3)
    assert v.wait(3, now=0.0, applied=1) == 0.0
    v.ended(3)
    assert v.wait(3, now=0.0, applied=1) is None
    v.observe(row, OK, seq=2, now=0.0)  # 400: back to no limit, and forgotten
    for _ in range(1000):
        v.started(3)
    assert v.wait(3, now=0.0, applied=2) is None
    assert v.held(now=0.0, applied=2) == []


def test_local_view_a_success_ends_the_hold_and_the_run_of_failures() -> None:
    v = view()
    row = make_row(trigger_id=3)
    for seq in (1, 2, 3):
        v.observe(row, HE, seq=seq, now=0.0)
    assert v.held(now=0.0, applied=0) == [3]
    v.observe(row, OK, seq=4, now=0.0)  # window 1 -> 2, not held
    assert v.held(now=0.0, applied=0) == []
    # The run starts again from zero: two more failures do not trip it.
    v.observe(row, HE, seq=5, now=0.0)
    v.observe(row, HE, seq=6, now=0.0)
    assert v.wait(3, now=0.0, applied=0) is None


def test_local_view_slow_start_after_a_trip() -> None:
    v = view()
    row = make_row(trigger_id=3)
    for seq in (1, 2, 3):
        v.observe(row, HE, seq=seq, now=0.0)
    windows = []
    for seq in range(4, 13):
        running = 0
        while v.wait(3, now=0.0, applied=seq) is None and running <= FULL:
            v.started(3)
            running += 1
        windows.append(running)
        for _ in range(running):
            v.ended(3)
        v.observe(row, OK, seq=seq, now=0.0)
    assert windows == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # 512 >= 400: no limit any more, and the trigger is forgotten.
    for _ in range(FULL + 1):
        v.started(3)
    assert v.wait(3, now=0.0, applied=99) is None
    assert v.held(now=0.0, applied=99) == []


def test_local_view_rate_limit_holds_until_retry_after() -> None:
    v = view()
    v.observe(make_row(trigger_id=3), Reschedule(2.0, FailureKind.RATE_LIMITED), seq=1, now=10.0)
    assert v.wait(3, now=10.5, applied=0) == 1.5
    assert v.held(now=11.9, applied=0) == [3]
    assert v.held(now=12.0, applied=0) == []
    assert v.wait(3, now=12.0, applied=0) is None


@pytest.mark.parametrize(
    ("outcome", "shape"),
    [
        (HE, "sync"),
        (HE, "handler"),
        (PERM, "async"),
        (Reschedule(0.05, FailureKind.GATE_SATURATED), "async"),
        (Release(), "async"),
        (SkipDepth(9, 8), "async"),
    ],
)
def test_local_view_ignores_what_says_nothing_about_the_target(
    outcome: Outcome, shape: Shape
) -> None:
    v = view()
    for seq in range(1, 10):
        v.observe(make_row(shape, trigger_id=3), outcome, seq=seq, now=0.0)
    assert v.held(now=0.0, applied=0) == []
    assert v.wait(3, now=0.0, applied=0) is None


def test_local_view_threshold_zero_never_holds_for_failures() -> None:
    v = LocalBreakers(threshold=0, full=FULL, hold_delay=HOLD)
    for seq in range(1, 10):
        v.observe(make_row(trigger_id=3), HE, seq=seq, now=0.0)
    assert v.held(now=0.0, applied=0) == []
    # Rate limits still hold.
    v.observe(make_row(trigger_id=3), RATE, seq=10, now=0.0)
    assert v.held(now=0.0, applied=0) == [3]
