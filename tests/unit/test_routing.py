from __future__ import annotations

import math
import random
import uuid
from dataclasses import replace
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.models import BackoffKind, RetryPolicy
from dispatcher.core.outcomes import (
    ClaimedRow,
    Complete,
    DeadLetter,
    DeadLetterReason,
    ErrorRecord,
    ExecutionResult,
    Failure,
    FailureKind,
    Limits,
    Outcome,
    Park,
    Reply,
    Reschedule,
    Resolution,
    ResolveDeadLetter,
    Retry,
    SkipDepth,
    Success,
)
from dispatcher.core.routing import (
    HANDLER_ORPHAN_MESSAGE,
    HTTP_STATUS,
    SYNC_ORPHAN_MESSAGE,
    UNAVAILABLE_MIN_DELAY,
    admit,
    http_status,
    retry_after_clamped,
    route,
)

PROPERTY = settings(database=None, deadline=None, max_examples=300)

Shape = Literal["async", "sync", "handler"]


class FixedRandom:
    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


# With jitter 0.5 and u = 0.75 every delay is 1.25 times the plain one:
# backoff(n) = 2 * 3 ** (n - 1) * 1.25 = 2.5, 7.5, 22.5, 67.5 for n = 1..4.
POLICY = RetryPolicy(
    kind=BackoffKind.EXPONENTIAL,
    base_delay=2.0,
    factor=3.0,
    max_delay=1000.0,
    jitter=0.5,
    max_attempts=4,
)
AGED = replace(POLICY, max_event_age=60.0)
LIMITS = Limits(max_trigger_depth=3, gate_retry_delay=0.2, max_rate_limited_age=1000.0)
U = 0.75
# 0.2 * (1 + 0.5 * (2 * 0.75 - 1))
GATE_DELAY = 0.25
LAST = POLICY.max_attempts - 1  # attempts consumed before the last allowed try
DL_ID = 77
MESSAGE = "boom"


def make_row(shape: Shape = "async", **changes: object) -> ClaimedRow:
    row = ClaimedRow(
        id=1,
        lease_token=uuid.UUID(int=1),
        event_id=uuid.UUID(int=2),
        trigger_id=3,
        scope="acme",
        trigger_name="on-user",
        target="https://example.test/hook",
        registered_by="alice",
        payload={"key": "users/42"},
        attempts=0,
        orphans=0,
        depth=0,
        reply_to="inbox-1" if shape == "sync" else None,
        dead_letter_id=DL_ID if shape == "handler" else None,
        policy=POLICY,
        timeout=5.0,
        age=10.0,
    )
    return row._replace(**changes)


def fail(kind: FailureKind, retry_after: float | None = None) -> Failure:
    return Failure(kind, MESSAGE, retry_after)


def err(attempt: int, kind: FailureKind) -> ErrorRecord:
    return ErrorRecord(attempt=attempt, kind=kind, message=MESSAGE)


HE = FailureKind.HANDLER_ERROR
TO = FailureKind.TIMEOUT
NF = FailureKind.TARGET_NOT_FOUND
PD = FailureKind.PERMISSION_DENIED
RL = FailureKind.RATE_LIMITED
GS = FailureKind.GATE_SATURATED
PE = FailureKind.PERMANENT
UA = FailureKind.UNAVAILABLE
R = DeadLetterReason

EXPECTED_STATUS = {HE: 500, TO: 504, NF: 404, PD: 403, RL: 429, GS: 503, PE: 422, UA: 503}


def test_http_status_table_covers_every_kind_with_its_code() -> None:
    assert dict(HTTP_STATUS) == EXPECTED_STATUS


@pytest.mark.parametrize("kind", list(FailureKind))
def test_http_status_of_a_failure(kind: FailureKind) -> None:
    assert http_status(fail(kind)) == EXPECTED_STATUS[kind]


def test_http_status_of_success_is_200() -> None:
    assert http_status(Success({"ok": True})) == 200


def test_http_status_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        HTTP_STATUS[HE] = 200  # type: ignore[index]


ADMIT_CASES: list[tuple[str, ClaimedRow, Outcome | None]] = [
    ("fresh async row runs", make_row(), None),
    ("depth at the limit runs", make_row(depth=3), None),
    ("async past depth is skipped", make_row(depth=4), SkipDepth(depth=4, limit=3)),
    (
        "depth is checked before a sync orphan",
        make_row("sync", depth=4, orphans=1),
        SkipDepth(depth=4, limit=3),
    ),
    (
        "depth is checked before a handler orphan",
        make_row("handler", depth=9, orphans=1),
        SkipDepth(depth=9, limit=3),
    ),
    (
        "depth is checked before lease expiry",
        make_row(depth=4, attempts=LAST, orphans=1),
        SkipDepth(depth=4, limit=3),
    ),
    ("sync row runs", make_row("sync"), None),
    (
        "sync row ignores attempts and age",
        make_row("sync", policy=AGED, attempts=10, age=1e9),
        None,
    ),
    (
        "orphaned sync row replies timeout",
        make_row("sync", orphans=1),
        Reply(Failure(TO, SYNC_ORPHAN_MESSAGE), 504),
    ),
    (
        "sync wins over handler when both are set",
        make_row("sync", dead_letter_id=DL_ID, orphans=1),
        Reply(Failure(TO, SYNC_ORPHAN_MESSAGE), 504),
    ),
    ("handler row runs", make_row("handler"), None),
    (
        "handler row ignores attempts and age",
        make_row("handler", policy=AGED, attempts=10, age=1e9),
        None,
    ),
    (
        "orphaned handler row fails its dead letter",
        make_row("handler", orphans=2),
        ResolveDeadLetter(DL_ID, Resolution.HANDLER_FAILED, HANDLER_ORPHAN_MESSAGE),
    ),
    ("attempts plus orphans below max runs", make_row(attempts=LAST - 1, orphans=1), None),
    ("attempts at max minus one runs", make_row(attempts=LAST), None),
    (
        "attempts plus orphans at max dead-letters",
        make_row(attempts=LAST - 1, orphans=2),
        DeadLetter(R.LEASE_EXPIRED, attempts=4, error=None),
    ),
    (
        "orphans alone at max dead-letter",
        make_row(orphans=4),
        DeadLetter(R.LEASE_EXPIRED, attempts=4, error=None),
    ),
    ("age below max_event_age runs", make_row(policy=AGED, age=59.9), None),
    (
        "age at max_event_age expires",
        make_row(policy=AGED, age=60.0, attempts=1),
        DeadLetter(R.EXPIRED, attempts=1, error=None),
    ),
    ("no max_event_age ignores age", make_row(age=1e12), None),
    (
        "lease expiry is checked before age",
        make_row(policy=AGED, age=100.0, attempts=LAST, orphans=1),
        DeadLetter(R.LEASE_EXPIRED, attempts=4, error=None),
    ),
]


@pytest.mark.parametrize(
    ("row", "expected"), [c[1:] for c in ADMIT_CASES], ids=[c[0] for c in ADMIT_CASES]
)
def test_admit(row: ClaimedRow, expected: Outcome | None) -> None:
    assert admit(row, LIMITS) == expected


def test_admit_messages_say_the_lease_expired() -> None:
    assert "lease expired" in SYNC_ORPHAN_MESSAGE
    assert "lease expired" in HANDLER_ORPHAN_MESSAGE


# (id, row, result, expected) for async rows.
ASYNC_CASES: list[tuple[str, ClaimedRow, ExecutionResult, Outcome]] = [
    ("success completes", make_row(), Success({"n": 1}), Complete()),
    ("success on the last attempt completes", make_row(attempts=LAST), Success(), Complete()),
    ("handler error retries", make_row(), fail(HE), Retry(2.5, 1, err(1, HE))),
    ("handler error backs off", make_row(attempts=1), fail(HE), Retry(7.5, 2, err(2, HE))),
    (
        "handler error backs off further",
        make_row(attempts=2),
        fail(HE),
        Retry(22.5, 3, err(3, HE)),
    ),
    (
        "handler error on the last attempt dead-letters",
        make_row(attempts=LAST),
        fail(HE),
        DeadLetter(R.HANDLER_ERROR, 4, err(4, HE)),
    ),
    ("timeout retries", make_row(), fail(TO), Retry(2.5, 1, err(1, TO))),
    (
        "timeout on the last attempt dead-letters",
        make_row(attempts=LAST),
        fail(TO),
        DeadLetter(R.TIMEOUT, 4, err(4, TO)),
    ),
    (
        "retry_after is ignored for a handler error",
        make_row(),
        fail(HE, retry_after=100.0),
        Retry(2.5, 1, err(1, HE)),
    ),
    (
        "permission denied parks when the policy says so",
        make_row(policy=replace(POLICY, park_on=frozenset({"permission_denied"})), attempts=2),
        fail(FailureKind.PERMISSION_DENIED),
        Park(FailureKind.PERMISSION_DENIED, err(3, FailureKind.PERMISSION_DENIED)),
    ),
    (
        "target not found parks when the policy says so",
        make_row(policy=replace(POLICY, park_on=frozenset({"target_not_found"}))),
        fail(FailureKind.TARGET_NOT_FOUND),
        Park(FailureKind.TARGET_NOT_FOUND, err(1, FailureKind.TARGET_NOT_FOUND)),
    ),
    (
        "a kind the policy does not park still dead-letters",
        make_row(policy=replace(POLICY, park_on=frozenset({"target_not_found"}))),
        fail(FailureKind.PERMISSION_DENIED),
        DeadLetter(R.PERMISSION_DENIED, 1, err(1, FailureKind.PERMISSION_DENIED)),
    ),
    (
        "orphans do not count in the attempt number",
        make_row(attempts=1, orphans=1),
        fail(HE),
        Retry(7.5, 2, err(2, HE)),
    ),
    (
        "orphans count toward the budget and keep the real error",
        make_row(attempts=1, orphans=2),
        fail(HE),
        DeadLetter(R.HANDLER_ERROR, 4, err(2, HE)),
    ),
    (
        "handler error past max_event_age expires",
        make_row(policy=AGED, age=60.0),
        fail(HE),
        DeadLetter(R.EXPIRED, 1, err(1, HE)),
    ),
    (
        "timeout past max_event_age expires",
        make_row(policy=AGED, age=61.0, attempts=2),
        fail(TO),
        DeadLetter(R.EXPIRED, 3, err(3, TO)),
    ),
    (
        "handler error whose retry starts before max_event_age retries",
        make_row(policy=AGED, age=57.0),
        fail(HE),
        Retry(2.5, 1, err(1, HE)),
    ),
    (
        "handler error whose retry would start past max_event_age expires now",
        make_row(policy=AGED, age=58.0),
        fail(HE),
        DeadLetter(R.EXPIRED, 1, err(1, HE)),
    ),
    (
        "max attempts is checked before age",
        make_row(policy=AGED, age=100.0, attempts=LAST),
        fail(HE),
        DeadLetter(R.HANDLER_ERROR, 4, err(4, HE)),
    ),
    *[
        (
            f"{kind.value} dead-letters at once{suffix}",
            make_row(attempts=attempts),
            fail(kind),
            DeadLetter(reason, attempts + 1, err(attempts + 1, kind)),
        )
        for kind, reason in [
            (NF, R.TARGET_NOT_FOUND),
            (PD, R.PERMISSION_DENIED),
            (PE, R.PERMANENT),
        ]
        for attempts, suffix in [(0, ""), (LAST, " on the last attempt")]
    ],
    (
        "permanent past max_event_age keeps its reason",
        make_row(policy=AGED, age=100.0),
        fail(PE),
        DeadLetter(R.PERMANENT, 1, err(1, PE)),
    ),
    (
        "rate limited waits retry_after",
        make_row(),
        fail(RL, retry_after=30.0),
        Reschedule(30.0, RL, err(1, RL)),
    ),
    (
        "rate limited on the last attempt still reschedules",
        make_row(attempts=LAST),
        fail(RL, retry_after=30.0),
        Reschedule(30.0, RL, err(4, RL)),
    ),
    (
        "rate limited without retry_after backs off",
        make_row(),
        fail(RL),
        Reschedule(2.5, RL, err(1, RL)),
    ),
    (
        "rate limited backs off from the consumed attempts",
        make_row(attempts=2),
        fail(RL),
        Reschedule(22.5, RL, err(3, RL)),
    ),
    (
        "rate limited without retry_after on the last attempt",
        make_row(attempts=LAST),
        fail(RL),
        Reschedule(67.5, RL, err(4, RL)),
    ),
    *[
        (
            f"rate limited with retry_after {value} backs off",
            make_row(),
            fail(RL, retry_after=value),
            Reschedule(2.5, RL, err(1, RL)),
        )
        for value in (0.0, -5.0, math.nan, math.inf)
    ],
    *[
        (
            f"rate limited with retry_after {value} under a policy without delays waits the floor",
            make_row(policy=replace(POLICY, base_delay=0.0, max_delay=0.0)),
            fail(RL, retry_after=value),
            Reschedule(UNAVAILABLE_MIN_DELAY, RL, err(1, RL)),
        )
        for value in (None, math.nan)
    ],
    (
        "rate limited with a retry_after past the cap waits the cap",
        make_row(),
        fail(RL, retry_after=10 * 86_400.0),
        Reschedule(LIMITS.max_retry_after, RL, err(1, RL)),
    ),
    (
        "rate limited with a clamped retry_after past the age bound expires",
        make_row(age=800.0),
        fail(RL, retry_after=10 * 86_400.0),
        DeadLetter(R.EXPIRED, 0, err(1, RL)),
    ),
    (
        "rate limited with a clamped retry_after past max_event_age expires",
        make_row(policy=AGED),
        fail(RL, retry_after=10 * 86_400.0),
        DeadLetter(R.EXPIRED, 0, err(1, RL)),
    ),
    (
        "rate limited up to max_event_age reschedules",
        make_row(policy=AGED, age=50.0),
        fail(RL, retry_after=10.0),
        Reschedule(10.0, RL, err(1, RL)),
    ),
    (
        "rate limited past max_event_age expires without consuming an attempt",
        make_row(policy=AGED, age=50.0, attempts=2),
        fail(RL, retry_after=10.5),
        DeadLetter(R.EXPIRED, 2, err(3, RL)),
    ),
    (
        "rate limited up to the dispatcher's age bound reschedules",
        make_row(age=990.0),
        fail(RL, retry_after=10.0),
        Reschedule(10.0, RL, err(1, RL)),
    ),
    (
        "rate limited past the dispatcher's age bound expires",
        make_row(age=990.0),
        fail(RL, retry_after=11.0),
        DeadLetter(R.EXPIRED, 0, err(1, RL)),
    ),
    (
        "rate limited backoff past the age bound expires",
        make_row(age=998.0),
        fail(RL),
        DeadLetter(R.EXPIRED, 0, err(1, RL)),
    ),
    (
        "the policy's age bound replaces the dispatcher's",
        make_row(policy=replace(POLICY, max_event_age=5000.0), age=2000.0),
        fail(RL, retry_after=10.0),
        Reschedule(10.0, RL, err(1, RL)),
    ),
    (
        "unavailable reschedules after the policy's delay",
        make_row(),
        fail(UA),
        Reschedule(2.5, UA, err(1, UA)),
    ),
    (
        "unavailable backs off from the consumed attempts",
        make_row(attempts=2),
        fail(UA),
        Reschedule(22.5, UA, err(3, UA)),
    ),
    (
        "unavailable on the last attempt reschedules without using it",
        make_row(attempts=LAST),
        fail(UA),
        Reschedule(67.5, UA, err(4, UA)),
    ),
    (
        "unavailable ignores orphans in the budget",
        make_row(attempts=1, orphans=2),
        fail(UA),
        Reschedule(7.5, UA, err(2, UA)),
    ),
    (
        "unavailable ignores retry_after",
        make_row(),
        fail(UA, retry_after=100.0),
        Reschedule(2.5, UA, err(1, UA)),
    ),
    (
        "unavailable under a policy without delays waits the floor",
        make_row(policy=replace(POLICY, base_delay=0.0, max_delay=0.0)),
        fail(UA),
        Reschedule(UNAVAILABLE_MIN_DELAY, UA, err(1, UA)),
    ),
    (
        "unavailable up to max_event_age reschedules",
        make_row(policy=AGED, age=57.5),
        fail(UA),
        Reschedule(2.5, UA, err(1, UA)),
    ),
    (
        "unavailable past max_event_age expires without consuming an attempt",
        make_row(policy=AGED, age=50.0, attempts=2),
        fail(UA),
        DeadLetter(R.EXPIRED, 2, err(3, UA)),
    ),
    (
        "unavailable past the dispatcher's age bound expires",
        make_row(age=998.0),
        fail(UA),
        DeadLetter(R.EXPIRED, 0, err(1, UA)),
    ),
    (
        "unavailable is not parked, whatever the policy parks",
        make_row(policy=replace(POLICY, park_on=frozenset({"permission_denied"}))),
        fail(UA),
        Reschedule(2.5, UA, err(1, UA)),
    ),
    ("gate saturated reschedules", make_row(), fail(GS), Reschedule(GATE_DELAY, GS, None)),
    (
        "gate saturated on the last attempt reschedules",
        make_row(attempts=LAST),
        fail(GS),
        Reschedule(GATE_DELAY, GS, None),
    ),
    (
        "gate saturated ignores age",
        make_row(policy=AGED, age=1e9),
        fail(GS),
        Reschedule(GATE_DELAY, GS, None),
    ),
]


@pytest.mark.parametrize(
    ("row", "result", "expected"), [c[1:] for c in ASYNC_CASES], ids=[c[0] for c in ASYNC_CASES]
)
def test_route_async(row: ClaimedRow, result: ExecutionResult, expected: Outcome) -> None:
    assert route(row, result, LIMITS, FixedRandom(U)) == expected


ALL_RESULTS: list[ExecutionResult] = [
    Success({"answer": 42}),
    *[fail(kind, retry_after=5.0) for kind in FailureKind],
]


@pytest.mark.parametrize("result", ALL_RESULTS, ids=repr)
@pytest.mark.parametrize("attempts", [0, LAST, 10])
@pytest.mark.parametrize("orphans", [0, 1])
def test_route_sync_always_replies(result: ExecutionResult, attempts: int, orphans: int) -> None:
    row = make_row("sync", attempts=attempts, orphans=orphans, policy=AGED, age=1e6)
    expected_status = 200 if isinstance(result, Success) else EXPECTED_STATUS[result.kind]
    assert route(row, result, LIMITS, FixedRandom(U)) == Reply(result, expected_status)


@pytest.mark.parametrize("attempts", [0, LAST, 10])
def test_route_handler_success_marks_handled(attempts: int) -> None:
    row = make_row("handler", attempts=attempts, policy=AGED, age=1e6)
    assert route(row, Success(), LIMITS, FixedRandom(U)) == ResolveDeadLetter(
        DL_ID, Resolution.HANDLED, None
    )


@pytest.mark.parametrize("kind", list(FailureKind))
@pytest.mark.parametrize("attempts", [0, LAST, 10])
def test_route_handler_failure_marks_handler_failed(kind: FailureKind, attempts: int) -> None:
    row = make_row("handler", attempts=attempts, policy=AGED, age=1e6)
    assert route(row, fail(kind, retry_after=5.0), LIMITS, FixedRandom(U)) == ResolveDeadLetter(
        DL_ID, Resolution.HANDLER_FAILED, f"{kind.value}: {MESSAGE}"
    )


@pytest.mark.parametrize("shape", ["async", "sync", "handler"])
@pytest.mark.parametrize("result", [Success(), fail(HE), fail(GS), fail(PE)], ids=repr)
def test_route_past_depth_skips(shape: Shape, result: ExecutionResult) -> None:
    row = make_row(shape, depth=4)
    assert route(row, result, LIMITS, FixedRandom(U)) == SkipDepth(depth=4, limit=3)


def test_route_at_depth_limit_is_not_skipped() -> None:
    assert route(make_row(depth=3), Success(), LIMITS, FixedRandom(U)) == Complete()


@pytest.mark.parametrize(("u", "expected"), [(0.0, 0.1), (0.5, 0.2), (1.0, 0.30000000000000004)])
def test_gate_delay_spreads_by_half(u: float, expected: float) -> None:
    outcome = route(make_row(), fail(GS), LIMITS, FixedRandom(u))
    assert outcome == Reschedule(expected, GS, None)


def test_gate_delay_never_negative() -> None:
    limits = replace(LIMITS, gate_retry_delay=-1.0)
    outcome = route(make_row(), fail(GS), limits, FixedRandom(U))
    assert outcome == Reschedule(0.0, GS, None)


DIRTY = "bad\x00 \ud800 news"
CLEAN = "bad \ufffd news"


def test_route_sanitises_error_records() -> None:
    outcome = route(make_row(), Failure(HE, DIRTY), LIMITS, FixedRandom(U))
    assert outcome == Retry(2.5, 1, ErrorRecord(1, HE, CLEAN))


def test_route_bounds_long_error_messages() -> None:
    outcome = route(make_row(), Failure(PE, "x" * 100_000), LIMITS, FixedRandom(U))
    assert isinstance(outcome, DeadLetter)
    assert outcome.error is not None
    assert len(outcome.error.message) <= 8192
    assert "characters omitted" in outcome.error.message


def test_route_sanitises_handler_failure() -> None:
    outcome = route(make_row("handler"), Failure(TO, DIRTY), LIMITS, FixedRandom(U))
    assert outcome == ResolveDeadLetter(DL_ID, Resolution.HANDLER_FAILED, f"timeout: {CLEAN}")


def test_route_sanitises_sync_replies() -> None:
    row = make_row("sync")
    failed = route(row, Failure(RL, DIRTY, 3.0), LIMITS, FixedRandom(U))
    assert failed == Reply(Failure(RL, CLEAN, 3.0), 429)
    succeeded = route(row, Success({"x": math.nan, "k\x00": (1, 2**80)}), LIMITS, FixedRandom(U))
    assert succeeded == Reply(Success({"x": None, "k": [1, str(2**80)]}), 200)


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    kind = draw(st.sampled_from(BackoffKind))
    base = draw(st.floats(0.0, 100.0))
    return RetryPolicy(
        kind=kind,
        base_delay=base,
        factor=draw(st.floats(1.0, 10.0)),
        max_delay=draw(st.floats(base, 10_000.0)),
        jitter=draw(st.floats(0.0, 1.0)),
        max_attempts=draw(st.integers(1, 20)),
        max_event_age=draw(st.none() | st.floats(1.0, 10_000.0)),
    )


@st.composite
def rows(draw: st.DrawFn, shape: Shape | None = None) -> ClaimedRow:
    policy = draw(policies())
    # A consistent row: each claim adds at most one to attempts + orphans, and a row that
    # reaches max_attempts is dead-lettered, so their sum never exceeds it.
    used = draw(st.integers(0, policy.max_attempts))
    orphans = draw(st.integers(0, used))
    return make_row(
        shape or draw(st.sampled_from(["async", "sync", "handler"])),
        policy=policy,
        attempts=used - orphans,
        orphans=orphans,
        depth=draw(st.integers(0, 5)),
        age=draw(st.floats(0.0, 20_000.0)),
    )


results = st.one_of(
    st.builds(Success, st.none() | st.integers() | st.text()),
    st.builds(
        Failure,
        st.sampled_from(FailureKind),
        st.text(st.characters(exclude_categories=())),
        st.none() | st.floats(allow_nan=True, allow_infinity=True),
    ),
)
seeds = st.integers(0, 2**32)


@PROPERTY
@given(row=rows(), result=results, seed=seeds)
def test_sync_and_handler_rows_are_never_retried(
    row: ClaimedRow, result: ExecutionResult, seed: int
) -> None:
    outcome = route(row, result, LIMITS, random.Random(seed))
    if row.depth > LIMITS.max_trigger_depth:
        assert isinstance(outcome, SkipDepth)
    elif row.reply_to is not None:
        assert isinstance(outcome, Reply)
    elif row.dead_letter_id is not None:
        assert isinstance(outcome, ResolveDeadLetter)
    else:
        assert isinstance(outcome, Complete | Retry | Reschedule | DeadLetter)


@PROPERTY
@given(row=rows("async"), result=results, seed=seeds)
def test_attempts_never_exceed_max_attempts(
    row: ClaimedRow, result: ExecutionResult, seed: int
) -> None:
    max_attempts = row.policy.max_attempts
    admitted = admit(row, LIMITS)
    if isinstance(admitted, DeadLetter):
        assert admitted.attempts <= max_attempts
    if admitted is not None:
        return
    outcome = route(row, result, LIMITS, random.Random(seed))
    if isinstance(outcome, Retry):
        assert outcome.attempts == row.attempts + 1 < max_attempts
    if isinstance(outcome, DeadLetter):
        assert outcome.attempts <= max_attempts
    if isinstance(outcome, Retry | DeadLetter) and outcome.error is not None:
        assert outcome.error.attempt <= max_attempts


@PROPERTY
@given(row=rows("async"), result=results, seed=seeds)
def test_delays_are_finite_and_bounded(row: ClaimedRow, result: ExecutionResult, seed: int) -> None:
    outcome = route(row, result, LIMITS, random.Random(seed))
    if isinstance(outcome, Retry):
        assert 0.0 <= outcome.delay <= row.policy.max_delay
    if isinstance(outcome, Reschedule):
        assert math.isfinite(outcome.delay)
        assert outcome.delay >= 0.0
        bound = row.policy.max_event_age or LIMITS.max_rate_limited_age
        if outcome.kind in (RL, UA):
            assert row.age + outcome.delay <= bound
        if outcome.kind is UA:
            assert outcome.delay >= UNAVAILABLE_MIN_DELAY
        if isinstance(result, Failure) and result.retry_after is not None:
            usable = math.isfinite(result.retry_after) and result.retry_after > 0
            if outcome.kind is RL and usable:
                assert outcome.delay <= LIMITS.max_retry_after


@PROPERTY
@given(row=rows("async"), seed=seeds)
def test_unavailable_never_uses_an_attempt(row: ClaimedRow, seed: int) -> None:
    outcome = route(row, fail(UA), LIMITS, random.Random(seed))
    if row.depth > LIMITS.max_trigger_depth:
        assert isinstance(outcome, SkipDepth)
    elif isinstance(outcome, DeadLetter):
        assert (outcome.reason, outcome.attempts) == (R.EXPIRED, row.attempts)
    else:
        assert isinstance(outcome, Reschedule)
        assert outcome.kind is UA


@PROPERTY
@given(row=rows(), result=results, seed=seeds)
def test_route_is_deterministic_and_messages_are_storable(
    row: ClaimedRow, result: ExecutionResult, seed: int
) -> None:
    outcome = route(row, result, LIMITS, random.Random(seed))
    assert route(row, result, LIMITS, random.Random(seed)) == outcome
    texts: list[str] = []
    if isinstance(outcome, Retry | Reschedule | DeadLetter) and outcome.error is not None:
        texts.append(outcome.error.message)
    if isinstance(outcome, ResolveDeadLetter) and outcome.error is not None:
        texts.append(outcome.error)
    if isinstance(outcome, Reply) and isinstance(outcome.result, Failure):
        texts.append(outcome.result.message)
    for text in texts:
        assert "\x00" not in text
        text.encode("utf-8")


@pytest.mark.parametrize(
    ("shape", "result", "clamped"),
    [
        ("async", fail(RL, retry_after=LIMITS.max_retry_after + 1), True),
        ("async", fail(RL, retry_after=LIMITS.max_retry_after), False),
        ("async", fail(RL, retry_after=math.inf), False),  # no usable value: backoff
        ("async", fail(RL, retry_after=math.nan), False),
        ("async", fail(RL), False),
        ("async", fail(HE), False),
        ("async", Success(), False),
        ("sync", fail(RL, retry_after=LIMITS.max_retry_after + 1), False),
        ("handler", fail(RL, retry_after=LIMITS.max_retry_after + 1), False),
    ],
)
def test_retry_after_clamped_says_when_routing_cuts_it(
    shape: Shape, result: ExecutionResult, clamped: bool
) -> None:
    assert retry_after_clamped(make_row(shape), result, LIMITS) is clamped
