"""The admin API against real Postgres: listing, replay, discard, purge, status, views."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from dead_letter_seed import (
    SNAPSHOT_POLICY,
    abandoned,
    add_trigger,
    dead_letter,
    enqueue,
    rows,
    set_state,
)
from flow_seed import park, set_breaker
from schema_history import downgrade

from dispatcher.admin import (
    Admin,
    DeadLetterFilter,
    DeadLetterNotFound,
    ReplayReport,
    parse_duration,
)
from dispatcher.core.errors import DispatcherError, InvalidInput, TriggerNotFound
from dispatcher.core.models import BackoffKind, RetryPolicy
from dispatcher.core.outcomes import DeadLetterReason, Resolution
from dispatcher.flow import FlowControl
from dispatcher.migrate import migrate
from dispatcher.runtime.dispatcher import Dispatcher, DispatcherConfig
from dispatcher.runtime.handlers import HandlerContext, HandlerRegistry
from dispatcher.triggers import TriggerRegistry

pytestmark = pytest.mark.anyio

ADMIN = Admin()
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


async def db_now(conn: asyncpg.Connection) -> datetime:
    return await conn.fetchval("SELECT clock_timestamp()")  # type: ignore[no-any-return]


async def ensure_trigger(conn: asyncpg.Connection, name: str, scope: str = "acme") -> int:
    try:
        return (await TriggerRegistry().get_by_name(conn, scope, name)).id
    except TriggerNotFound:
        return await add_trigger(conn, name, scope=scope)


async def seed_mix(conn: asyncpg.Connection) -> dict[str, int]:
    """Five letters spread over scopes, triggers, reasons, resolutions and ages."""
    welcome = await ensure_trigger(conn, "welcome")
    billing = await ensure_trigger(conn, "billing")
    g_welcome = await ensure_trigger(conn, "welcome", scope="globex")
    ids = {
        "a": await dead_letter(conn, trigger_id=welcome, age=HOUR),
        "b": await dead_letter(conn, trigger_id=welcome, reason="timeout", age=3 * DAY),
        "c": await dead_letter(
            conn,
            trigger_id=billing,
            trigger_name="billing",
            reason="permanent",
            resolution="replayed",
            replayed_as=uuid.uuid4(),
            age=10 * DAY,
        ),
        "d": await dead_letter(
            conn,
            trigger_id=g_welcome,
            scope="globex",
            reason="timeout",
            resolution="discarded",
            age=20 * DAY,
        ),
        "e": await dead_letter(
            conn,
            trigger_id=billing,
            trigger_name="billing",
            resolution="handler_failed",
            age=2 * HOUR,
        ),
    }
    return ids | {"welcome": welcome, "billing": billing, "g_welcome": g_welcome}


Build = Callable[[dict[str, int], datetime], DeadLetterFilter]
FILTERS: list[tuple[str, Build, str]] = [
    ("none", lambda ids, now: DeadLetterFilter(), "abcde"),
    ("scope", lambda ids, now: DeadLetterFilter(scope="acme"), "abce"),
    ("trigger", lambda ids, now: DeadLetterFilter(trigger="welcome"), "abd"),
    ("trigger_id", lambda ids, now: DeadLetterFilter(trigger_id=ids["billing"]), "ce"),
    ("reason", lambda ids, now: DeadLetterFilter(reason=DeadLetterReason.TIMEOUT), "bd"),
    ("reason as text", lambda ids, now: DeadLetterFilter(reason="permanent"), "c"),  # type: ignore[arg-type]
    ("resolution", lambda ids, now: DeadLetterFilter(resolution=Resolution.OPEN), "ab"),
    ("since ago", lambda ids, now: DeadLetterFilter(since=5 * HOUR), "ae"),
    ("since moment", lambda ids, now: DeadLetterFilter(since=now - 5 * DAY), "abe"),
    ("older ago", lambda ids, now: DeadLetterFilter(older_than=5 * DAY), "cd"),
    ("older moment", lambda ids, now: DeadLetterFilter(older_than=now - 90 * MINUTE), "bcde"),
    ("ids", lambda ids, now: DeadLetterFilter(ids=(ids["c"], ids["a"])), "ac"),
    (
        "combined",
        lambda ids, now: DeadLetterFilter(scope="acme", reason=DeadLetterReason.HANDLER_ERROR),
        "ae",
    ),
    ("no match", lambda ids, now: DeadLetterFilter(scope="initech"), ""),
    (
        "for trigger scope/name",
        lambda ids, now: DeadLetterFilter().for_trigger(("globex", "welcome")),
        "d",
    ),
    (
        "for trigger id",
        lambda ids, now: DeadLetterFilter(reason="timeout").for_trigger(ids["welcome"]),  # type: ignore[arg-type]
        "b",
    ),
]


@pytest.mark.parametrize(("label", "build", "expected"), FILTERS, ids=[f[0] for f in FILTERS])
async def test_list_dead_letters_by_each_filter(
    conn: asyncpg.Connection, label: str, build: Build, expected: str
) -> None:
    ids = await seed_mix(conn)
    found = await ADMIN.list_dead_letters(conn, build(ids, await db_now(conn)))
    assert [d.id for d in found] == sorted((ids[k] for k in expected), reverse=True)


@pytest.mark.parametrize(
    ("letters", "message"),
    [
        (DeadLetterFilter(trigger="sync-crm"), "no trigger 'sync-crm'"),
        (DeadLetterFilter().for_trigger(("acme", "sync-crm")), "no trigger 'acme/sync-crm'"),
        (DeadLetterFilter(scope="initech", trigger="welcome"), "no trigger 'initech/welcome'"),
        (DeadLetterFilter(trigger_id=424242), "no trigger 424242"),
    ],
)
async def test_a_filter_naming_an_unknown_trigger_raises(
    conn: asyncpg.Connection, letters: DeadLetterFilter, message: str
) -> None:
    await seed_mix(conn)
    for action in (
        ADMIN.list_dead_letters(conn, letters),
        ADMIN.replay(conn, letters),
        ADMIN.discard(conn, letters),
    ):
        with pytest.raises(TriggerNotFound) as caught:
            await action
        assert str(caught.value) == message
    # Known but selecting nothing is not an error.
    await add_trigger(conn, "sync-crm")
    assert await ADMIN.list_dead_letters(conn, DeadLetterFilter(trigger="sync-crm")) == []


def test_for_trigger_refuses_a_filter_naming_another_trigger() -> None:
    with pytest.raises(InvalidInput, match="already names scope 'globex'"):
        DeadLetterFilter(scope="globex").for_trigger(("acme", "welcome"))
    with pytest.raises(InvalidInput, match="already names trigger id 3"):
        DeadLetterFilter(trigger_id=3).for_trigger(4)
    assert DeadLetterFilter(scope="acme").for_trigger(("acme", "w")) == DeadLetterFilter(
        scope="acme", trigger="w"
    )


async def test_list_fields_and_limit(conn: asyncpg.Connection) -> None:
    ids = await seed_mix(conn)
    found = await ADMIN.list_dead_letters(conn, None, limit=2)
    # Newest first.
    assert [d.id for d in found] == [ids["e"], ids["d"]]
    e = found[0]
    assert (e.scope, e.trigger_id, e.trigger_name) == ("acme", ids["billing"], "billing")
    assert (e.reason, e.resolution, e.attempts) == (
        DeadLetterReason.HANDLER_ERROR,
        Resolution.HANDLER_FAILED,
        3,
    )
    assert e.last_error == "ValueError: smtp refused #3"
    assert e.resolved_at is not None
    assert e.resolved_at > e.dead_lettered_at
    c = (await ADMIN.list_dead_letters(conn, DeadLetterFilter(ids=(ids["c"],))))[0]
    assert c.replayed_as is not None


async def test_last_error_of_bare_string_and_empty_histories(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    bare = await dead_letter(conn, trigger_id=t, errors=["worker crashed"])
    empty = await dead_letter(conn, trigger_id=t, errors=[])
    found = {d.id: d.last_error for d in await ADMIN.list_dead_letters(conn)}
    assert found == {bare: "worker crashed", empty: None}


BAD_FILTERS: list[tuple[str, dict[str, Any]]] = [
    ("scope", {"scope": ""}),
    ("trigger", {"trigger": "bad\nname"}),
    ("trigger_id", {"trigger_id": 0}),
    ("trigger_id", {"trigger_id": True}),
    ("trigger_id", {"trigger_id": 2**63}),
    ("reason", {"reason": "exploded"}),
    ("resolution", {"resolution": "closed"}),
    ("since", {"since": datetime(2026, 1, 1)}),  # naive: which timezone?
    ("since", {"since": 5}),
    ("since", {"since": -HOUR}),
    ("older_than", {"older_than": "7d"}),
    ("older_than", {"older_than": timedelta(days=100_000)}),
    ("ids", {"ids": ()}),
    ("ids", {"ids": (0,)}),
    ("ids", {"ids": ("7",)}),
    ("ids", {"ids": "12"}),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD_FILTERS)
def test_bad_filter_values_raise_typed_errors(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as info:
        DeadLetterFilter(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


async def test_bad_limits_and_ids_raise_before_touching_the_database(
    conn: asyncpg.Connection,
) -> None:
    for limit in (0, 10_001, True):
        with pytest.raises(InvalidInput, match="limit"):
            await ADMIN.list_dead_letters(conn, limit=limit)
    with pytest.raises(InvalidInput, match="id"):
        await ADMIN.show_dead_letter(conn, 0)
    with pytest.raises(InvalidInput, match="policy"):
        await ADMIN.replay(conn, DeadLetterFilter(), policy="latest")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="older_than"):
        await ADMIN.purge(conn, older_than=-DAY)
    with pytest.raises(InvalidInput, match="schema"):
        Admin(schema="Robert'); DROP TABLE x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(minutes=90)),
        ("0.5d", timedelta(hours=12)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-1d", "1d 2h", "h1", "99999999999999w"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidInput, match="duration"):
        parse_duration(text)


async def test_show_dead_letter(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    payload = {"event_id": str(uuid.uuid4()), "key": "users/ü", "value": [1, {"x": None}]}
    dl = await dead_letter(conn, trigger_id=t, payload=payload, depth=2, reason="timeout")
    d = await ADMIN.show_dead_letter(conn, dl)
    assert d.id == dl
    assert (d.trigger_id, d.scope, d.trigger_name, d.target) == (
        t,
        "acme",
        "welcome",
        "run_welcome",
    )
    assert d.registered_by == "user:7"
    assert d.payload == payload
    assert d.policy == SNAPSHOT_POLICY
    assert (d.depth, d.attempts, d.reason) == (2, 3, DeadLetterReason.TIMEOUT)
    assert [(e.attempt, e.kind) for e in d.errors] == [(n, "handler_error") for n in (1, 2, 3)]
    assert d.errors[0].message == "ValueError: smtp refused #1"
    assert d.errors[0].at == datetime(2026, 11, 22, 10, 1, 0, 123456, tzinfo=UTC)
    assert (d.resolution, d.resolved_at, d.replayed_as) == (Resolution.OPEN, None, None)
    assert d.event_created_at < d.dead_lettered_at
    assert (d.replay_pending, d.replay_dead_letter_id) == (False, None)


async def test_show_unknown_id_raises_typed_not_found(conn: asyncpg.Connection) -> None:
    with pytest.raises(DeadLetterNotFound) as info:
        await ADMIN.show_dead_letter(conn, 424242)
    assert isinstance(info.value, DispatcherError)
    assert isinstance(info.value, LookupError)
    assert info.value.ids == (424242,)
    assert str(info.value) == "no dead letter with id 424242"


async def outbox_for(conn: asyncpg.Connection, event_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(
        """SELECT *, due_at <= clock_timestamp() AS due_now, payload::text AS payload_text,
            errors::text AS errors_text
        FROM dispatcher.outbox WHERE event_id = $1""",
        event_id,
    )
    assert row is not None
    return row


async def test_replay_with_the_original_policy(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    payload = {"event_id": str(uuid.uuid4()), "key": "users/1", "value": {"n": 1}, "depth": 3}
    dl = await dead_letter(conn, trigger_id=t, payload=payload, depth=3, reason="timeout")
    report = await ADMIN.replay(conn, DeadLetterFilter(ids=(dl,)))
    assert not report.dry_run
    assert report.policy == "original"
    assert report.skipped == ()
    [r] = report.replayed
    assert r.event_id is not None
    assert (r.dead_letter_id, r.trigger_id, r.scope, r.trigger_name) == (dl, t, "acme", "welcome")
    snapshot = RetryPolicy(
        kind=BackoffKind.LINEAR,
        base_delay=2,
        factor=1,
        max_delay=20,
        jitter=0,
        max_attempts=3,
        max_event_age=3600,
    )
    assert (r.policy, r.timeout) == (snapshot, 12.0)

    row = await outbox_for(conn, r.event_id)
    assert (row["trigger_id"], row["scope"], row["trigger_name"]) == (t, "acme", "welcome")
    assert (row["target"], row["registered_by"]) == ("run_welcome", "user:7")
    assert json.loads(row["payload_text"]) == payload
    assert (row["attempts"], row["orphans"], row["depth"]) == (0, 0, 3)
    assert row["due_now"]
    assert row["lease_token"] is None
    assert row["reply_to"] is None
    assert row["dead_letter_id"] is None
    assert json.loads(row["errors_text"]) == []
    assert (
        row["retry_kind"],
        row["retry_base_delay"],
        row["retry_factor"],
        row["retry_max_delay"],
        row["retry_jitter"],
        row["max_attempts"],
        row["max_event_age"],
        row["timeout"],
    ) == ("linear", 2.0, 1.0, 20.0, 0.0, 3, 3600.0, 12.0)

    d = await ADMIN.show_dead_letter(conn, dl)
    assert d.resolution is Resolution.REPLAYED
    assert d.replayed_as == r.event_id
    assert d.resolved_at is not None
    assert d.replay_pending


async def test_replay_with_the_current_policy_skips_deleted_triggers(
    conn: asyncpg.Connection,
) -> None:
    current = RetryPolicy(kind=BackoffKind.CONSTANT, base_delay=7, max_delay=7, max_attempts=9)
    t = await add_trigger(conn, "welcome", retry=current, execution_timeout=99)
    gone = await add_trigger(conn, "billing")
    await TriggerRegistry().delete(conn, gone)
    live = await dead_letter(conn, trigger_id=t)
    orphan = await dead_letter(conn, trigger_id=gone, trigger_name="billing")

    report = await ADMIN.replay(conn, DeadLetterFilter(scope="acme"), policy="current")
    assert report.policy == "current"
    [r] = report.replayed
    assert (r.dead_letter_id, r.policy, r.timeout) == (live, current, 99.0)
    [s] = report.skipped
    assert s.dead_letter_id == orphan
    assert "no longer exists" in s.reason
    assert r.event_id is not None
    row = await outbox_for(conn, r.event_id)
    assert (row["retry_kind"], row["max_attempts"], row["timeout"]) == ("constant", 9, 99.0)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 1
    assert (await ADMIN.show_dead_letter(conn, orphan)).resolution is Resolution.OPEN

    # The original policy still works for the letter whose trigger is gone.
    again = await ADMIN.replay(conn, DeadLetterFilter(ids=(orphan,)))
    assert [x.dead_letter_id for x in again.replayed] == [orphan]


async def test_replay_carries_park_on_from_the_chosen_policy(conn: asyncpg.Connection) -> None:
    current = RetryPolicy(max_attempts=4, park_on={"target_not_found"})
    t = await add_trigger(conn, "welcome", retry=current)
    snapshot = SNAPSHOT_POLICY | {"park_on": ["permission_denied"]}
    kept = await dead_letter(conn, trigger_id=t, policy=snapshot)
    taken = await dead_letter(conn, trigger_id=t, policy=snapshot)
    older = await dead_letter(conn, trigger_id=t)  # a snapshot from before parking existed

    original = await ADMIN.replay(conn, DeadLetterFilter(ids=(kept, older)))
    by_letter = {r.dead_letter_id: r for r in original.replayed}
    assert by_letter[kept].policy.park_on == {"permission_denied"}
    assert by_letter[older].policy.park_on == frozenset()
    now = await ADMIN.replay(conn, DeadLetterFilter(ids=(taken,)), policy="current")
    [r] = now.replayed
    assert r.policy.park_on == {"target_not_found"}

    stored = {
        row["event_id"]: list(row["park_on"])
        for row in await conn.fetch("SELECT event_id, park_on FROM dispatcher.outbox")
    }
    assert stored == {
        by_letter[kept].event_id: ["permission_denied"],
        by_letter[older].event_id: [],
        r.event_id: ["target_not_found"],
    }


async def test_replayed_row_parks_as_its_policy_says(dsn: str, conn: asyncpg.Connection) -> None:
    """The park_on a replay stores is the one the runtime acts on."""
    t = await add_trigger(conn, "welcome", target="not.deployed")
    snapshot = SNAPSHOT_POLICY | {"park_on": ["target_not_found"], "max_attempts": 1}
    parks = await dead_letter(conn, trigger_id=t, policy=snapshot)
    dies = await dead_letter(conn, trigger_id=t, policy=SNAPSHOT_POLICY | {"max_attempts": 1})
    await ADMIN.replay(conn, DeadLetterFilter(ids=(parks, dies)))
    config = DispatcherConfig(poll_interval=0.05, breaker_threshold=0)
    stats = await Dispatcher(dsn, HandlerRegistry(), config=config).run_until_idle(
        include_scheduled=True
    )
    assert stats.parked == 1
    [parked] = await FlowControl().parked(conn)
    assert parked.reason == "target_not_found"
    again = await ADMIN.list_dead_letters(conn, DeadLetterFilter(resolution=Resolution.OPEN))
    assert [d.reason for d in again] == [DeadLetterReason.TARGET_NOT_FOUND]


async def test_replay_twice_replays_once(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    one = await dead_letter(conn, trigger_id=t)
    two = await dead_letter(conn, trigger_id=t, resolution="handler_failed")
    first = await ADMIN.replay(conn, DeadLetterFilter(trigger="welcome"))
    assert [r.dead_letter_id for r in first.replayed] == [one, two]
    second = await ADMIN.replay(conn, DeadLetterFilter(trigger="welcome"))
    assert second.replayed == ()
    by_id = await ADMIN.replay(conn, DeadLetterFilter(ids=(one, two)))
    assert by_id.replayed == ()
    assert [(s.dead_letter_id, s.reason) for s in by_id.skipped] == [
        (r.dead_letter_id, f"already replayed as {r.event_id}") for r in first.replayed
    ]
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 2


async def test_concurrent_replays_act_on_each_letter_once(
    dsn: str, conn: asyncpg.Connection
) -> None:
    t = await add_trigger(conn, "welcome")
    ids = tuple([await dead_letter(conn, trigger_id=t) for _ in range(3)])
    other = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        mine = await ADMIN.replay(conn, DeadLetterFilter(ids=ids))
        # The other operator does not wait on our locks: it leaves the letters to us.
        with anyio.fail_after(10):
            theirs = await ADMIN.replay(other, DeadLetterFilter(ids=ids))
        assert theirs.replayed == ()
        assert {s.reason for s in theirs.skipped} == {
            "locked by a concurrent replay or discard; try again"
        }
        await tx.commit()
        later = await ADMIN.replay(other, DeadLetterFilter(ids=ids))
        assert later.replayed == ()
        assert all(s.reason.startswith("already replayed as") for s in later.skipped)
    finally:
        await other.close()
    assert len(mine.replayed) == 3
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 3


async def test_replay_never_touches_final_resolutions(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    final = [await dead_letter(conn, trigger_id=t, resolution=r) for r in ("handled", "discarded")]
    report = await ADMIN.replay(conn, DeadLetterFilter(ids=tuple(final)))
    assert report.replayed == ()
    assert [s.reason for s in report.skipped] == ["already handled", "already discarded"]
    for resolution in (Resolution.REPLAYED, Resolution.HANDLED, Resolution.DISCARDED):
        with pytest.raises(InvalidInput, match="resolution"):
            await ADMIN.replay(conn, DeadLetterFilter(resolution=resolution))
        with pytest.raises(InvalidInput, match="resolution"):
            await ADMIN.discard(conn, DeadLetterFilter(resolution=resolution))
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0


async def test_replay_of_an_unknown_id_raises_and_changes_nothing(
    conn: asyncpg.Connection,
) -> None:
    t = await add_trigger(conn, "welcome")
    known = await dead_letter(conn, trigger_id=t)
    before = await rows(conn, "dead_letters")
    with pytest.raises(DeadLetterNotFound) as info:
        await ADMIN.replay(conn, DeadLetterFilter(ids=(known, 999_998, 999_999)))
    assert info.value.ids == (999_998, 999_999)
    assert await rows(conn, "dead_letters") == before
    assert await rows(conn, "outbox") == []
    with pytest.raises(DeadLetterNotFound):
        await ADMIN.discard(conn, DeadLetterFilter(ids=(known, 999_999)))
    assert await rows(conn, "dead_letters") == before


async def test_replay_explains_ids_outside_the_filter_and_the_limit(
    conn: asyncpg.Connection,
) -> None:
    t = await add_trigger(conn, "welcome")
    a, b, c = [await dead_letter(conn, trigger_id=t) for _ in range(3)]
    other = await dead_letter(conn, trigger_id=t, reason="timeout")
    report = await ADMIN.replay(
        conn, DeadLetterFilter(ids=(a, b, c, other), reason=DeadLetterReason.HANDLER_ERROR), limit=2
    )
    assert [r.dead_letter_id for r in report.replayed] == [a, b]  # oldest first
    assert [(s.dead_letter_id, s.reason) for s in report.skipped] == [
        (c, "beyond the limit"),
        (other, "does not match the other filters"),
    ]


async def test_unusable_policy_snapshot_is_skipped_not_enqueued(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    broken = await dead_letter(conn, trigger_id=t, policy={"kind": "exponential"})
    bad_value = await dead_letter(conn, trigger_id=t, policy=SNAPSHOT_POLICY | {"jitter": 7})
    fine = await dead_letter(conn, trigger_id=t)
    report = await ADMIN.replay(conn, DeadLetterFilter())
    assert [r.dead_letter_id for r in report.replayed] == [fine]
    reasons = {s.dead_letter_id: s.reason for s in report.skipped}
    assert set(reasons) == {broken, bad_value}
    assert reasons[broken].startswith("unusable original policy")
    assert "jitter" in reasons[bad_value]
    assert (await ADMIN.show_dead_letter(conn, broken)).resolution is Resolution.OPEN


async def snapshot(conn: asyncpg.Connection) -> list[list[Any]]:
    return [await rows(conn, t) for t in ("dead_letters", "outbox", "triggers")]


def same_plan(dry: ReplayReport, real: ReplayReport) -> bool:
    def key(r: ReplayReport) -> list[Any]:
        return [(x.dead_letter_id, x.policy, x.timeout) for x in r.replayed] + list(r.skipped)

    return key(dry) == key(real)


async def test_dry_runs_change_nothing_and_report_what_would_happen(
    conn: asyncpg.Connection,
) -> None:
    ids = await seed_mix(conn)
    await dead_letter(conn, trigger_id=ids["welcome"], resolution="handled", age=30 * DAY)
    before = await snapshot(conn)

    for policy in ("original", "current"):
        dry = await ADMIN.replay(conn, DeadLetterFilter(), policy=policy, dry_run=True)  # type: ignore[arg-type]
        assert dry.dry_run
        assert all(r.event_id is None for r in dry.replayed)
        assert {r.dead_letter_id for r in dry.replayed} == {ids["a"], ids["b"], ids["e"]}
    assert await ADMIN.discard(conn, DeadLetterFilter(scope="acme"), dry_run=True) == 3
    # d (discarded 10 days ago) and the handled one (15 days ago); c was replayed 5 days ago.
    assert await ADMIN.purge(conn, older_than=7 * DAY, dry_run=True) == 2
    assert await snapshot(conn) == before

    # The dry run and the real run agree.
    dry = await ADMIN.replay(conn, DeadLetterFilter(trigger="welcome"), dry_run=True)
    real = await ADMIN.replay(conn, DeadLetterFilter(trigger="welcome"))
    assert same_plan(dry, real)
    assert len(real.replayed) == 2
    assert await snapshot(conn) != before


async def test_replay_sends_one_wake_hint_and_none_when_nothing_is_enqueued(
    dsn: str, conn: asyncpg.Connection
) -> None:
    t = await add_trigger(conn, "welcome")
    for _ in range(3):
        await dead_letter(conn, trigger_id=t)
    heard: list[str] = []
    sentinel = anyio.Event()
    listener = await asyncpg.connect(dsn)

    def on_notify(_c: object, _pid: int, channel: str, _payload: str) -> None:
        heard.append(channel)
        if channel == "sentinel":
            sentinel.set()

    try:
        await listener.add_listener("dispatcher_wake", on_notify)
        await listener.add_listener("sentinel", on_notify)
        await ADMIN.replay(conn, DeadLetterFilter(), dry_run=True)
        await ADMIN.replay(conn, DeadLetterFilter())
        await ADMIN.replay(conn, DeadLetterFilter())  # nothing left: no hint
        # Notifications arrive in commit order, so once the sentinel is heard every hint
        # the replays sent has been heard too.
        await conn.execute("SELECT pg_notify('sentinel', '')")
        with anyio.fail_after(10):
            await sentinel.wait()
    finally:
        await listener.close()
    assert heard == ["dispatcher_wake", "sentinel"]


async def test_discard(conn: asyncpg.Connection) -> None:
    ids = await seed_mix(conn)
    before = {r["id"]: r for r in await conn.fetch("SELECT * FROM dispatcher.dead_letters")}
    assert await ADMIN.discard(conn, DeadLetterFilter(scope="acme")) == 3  # a, b, e
    after = {r["id"]: r for r in await conn.fetch("SELECT * FROM dispatcher.dead_letters")}
    for k in "abe":
        assert after[ids[k]]["resolution"] == "discarded"
        assert after[ids[k]]["resolved_at"] is not None
        assert after[ids[k]]["replayed_as"] is None
    for k in "cd":
        assert after[ids[k]] == before[ids[k]]
    assert await ADMIN.discard(conn, DeadLetterFilter(scope="acme")) == 0
    assert await rows(conn, "outbox") == []


async def test_discard_respects_the_limit_oldest_first(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    a, b, c = [await dead_letter(conn, trigger_id=t) for _ in range(3)]
    assert await ADMIN.discard(conn, DeadLetterFilter(), limit=2) == 2
    left = await ADMIN.list_dead_letters(conn, DeadLetterFilter(resolution=Resolution.OPEN))
    assert [d.id for d in left] == [c]
    assert {a, b}.isdisjoint(d.id for d in left)


async def test_purge_deletes_only_old_final_letters(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    old = 40 * DAY
    kept = {
        "open": await dead_letter(conn, trigger_id=t, age=old),
        "handler_failed": await dead_letter(
            conn, trigger_id=t, resolution="handler_failed", age=old, resolved_age=old
        ),
        "recent": await dead_letter(
            conn, trigger_id=t, resolution="handled", age=old, resolved_age=DAY
        ),
    }
    gone = [
        await dead_letter(conn, trigger_id=t, resolution=r, age=old, resolved_age=30 * DAY)
        for r in ("handled", "replayed", "discarded")
    ]
    assert await ADMIN.purge(conn, older_than=7 * DAY, dry_run=True) == 3
    assert len(await rows(conn, "dead_letters")) == 6
    assert await ADMIN.purge(conn, older_than=7 * DAY) == 3
    left = {r["id"] for r in await conn.fetch("SELECT id FROM dispatcher.dead_letters")}
    assert left == set(kept.values())
    assert left.isdisjoint(gone)
    assert await ADMIN.purge(conn, older_than=7 * DAY) == 0
    # Even "everything resolved up to now" leaves the open and handler_failed letters.
    assert await ADMIN.purge(conn, older_than=timedelta(0)) == 1
    left = {r["id"] for r in await conn.fetch("SELECT id FROM dispatcher.dead_letters")}
    assert left == {kept["open"], kept["handler_failed"]}


async def seed_outbox(conn: asyncpg.Connection) -> dict[str, int]:
    welcome = await add_trigger(conn, "welcome")
    billing = await add_trigger(conn, "billing", key_pattern="users/b*")
    # users/b* keys match both triggers; users/a* only welcome.
    w = await enqueue(conn, "users/a1", "users/a2", "users/a3")
    wb = await enqueue(conn, "users/b1", "users/b2")
    await set_state(conn, w[0], due_in=-60)  # due for a minute
    await set_state(conn, w[1], due_in=-5, leased=True)  # lease expired: due again
    await set_state(conn, w[2], due_in=300)  # retry scheduled
    await set_state(conn, wb[0], due_in=30, leased=True)  # in lease
    await set_state(conn, wb[1], due_in=30, leased=True)  # in lease
    await set_state(conn, wb[2], due_in=-1)
    await set_state(conn, wb[3], due_in=600)
    return {"welcome": welcome, "billing": billing}


async def test_status_numbers(conn: asyncpg.Connection) -> None:
    triggers = await seed_outbox(conn)
    # A parked row sits at due_at = 'infinity': parked, not "scheduled later".
    [parked] = await enqueue(conn, "users/a4")
    await park(conn, parked)
    ids = await seed_mix(conn)
    await dead_letter(conn, trigger_id=ids["welcome"], reason="timeout")
    for outcome in ("success", "failure"):
        await abandoned(conn, outcome=outcome)

    report = await ADMIN.status(conn)
    o = report.outbox
    assert (o.due_now, o.scheduled, o.leased, o.parked, o.total) == (3, 2, 2, 1, 8)
    assert o.oldest_due_seconds is not None
    assert 60 <= o.oldest_due_seconds < 120
    assert report.dead_letters_by_resolution == {
        Resolution.OPEN: 3,
        Resolution.HANDLED: 0,
        Resolution.HANDLER_FAILED: 1,
        Resolution.REPLAYED: 1,
        Resolution.DISCARDED: 1,
    }
    assert report.unresolved_by_reason == {
        DeadLetterReason.HANDLER_ERROR: 2,
        DeadLetterReason.TIMEOUT: 2,
    }
    assert [
        (t.trigger_id, t.trigger_name, t.total, t.due_now, t.parked) for t in report.top_backlog
    ] == [
        (triggers["welcome"], "welcome", 6, 3, 1),
        (triggers["billing"], "billing", 2, 0, 0),
    ]
    assert report.abandoned_executions == 2
    assert (report.pauses, report.breakers) == ((), ())
    assert abs((report.at - await db_now(conn)).total_seconds()) < 60


async def test_status_of_empty_tables(conn: asyncpg.Connection) -> None:
    report = await ADMIN.status(conn)
    o = report.outbox
    assert (o.due_now, o.scheduled, o.leased, o.parked) == (0, 0, 0, 0)
    assert report.outbox.oldest_due_seconds is None
    assert set(report.dead_letters_by_resolution.values()) == {0}
    assert report.unresolved_by_reason == {}
    assert report.top_backlog == ()
    assert report.abandoned_executions == 0
    assert (report.pauses, report.breakers) == ((), ())


async def test_status_shows_pauses_and_breakers_as_flow_control_lists_them(
    conn: asyncpg.Connection,
) -> None:
    flow = FlowControl()
    welcome = await add_trigger(conn, "welcome")
    billing = await add_trigger(conn, "billing")
    audit = await add_trigger(conn, "audit")
    calm = await add_trigger(conn, "calm")
    gone = await add_trigger(conn, "gone")
    await flow.pause(conn, scope="globex", note="migrating globex")
    await flow.pause(conn, trigger_id=billing)
    await flow.pause(conn, everything=True, note="upgrade")
    probe = (await enqueue(conn, "users/1"))[0]
    await set_breaker(conn, welcome, state="open", failures=3, open_for=60, opened_count=2)
    await set_breaker(conn, billing, state="closed", failures=2)
    await set_breaker(conn, audit, state="half_open", failures=3, probe_id=probe, opened_count=1)
    await set_breaker(conn, calm, state="closed", failures=0)  # healthy: not listed
    await set_breaker(conn, gone, state="open", failures=5, open_for=30, opened_count=1)
    await TriggerRegistry().delete(conn, gone)  # its breaker row outlives it

    report = await ADMIN.status(conn)
    assert [(p.target, p.note) for p in report.pauses] == [
        ("scope globex", "migrating globex"),
        (f"trigger {billing} (billing)", None),
        ("everything", "upgrade"),
    ]
    assert [(b.trigger_id, b.trigger_name, b.state, b.failures) for b in report.breakers] == [
        (gone, None, "open", 5),
        (audit, "audit", "half_open", 3),
        (billing, "billing", "closed", 2),
        (welcome, "welcome", "open", 3),
    ]
    [half_open] = [b for b in report.breakers if b.state == "half_open"]
    assert (half_open.probe_id, half_open.opened_count, half_open.open_until) == (probe, 1, None)
    [opened] = [b for b in report.breakers if b.trigger_id == welcome]
    assert opened.open_until is not None
    assert opened.open_until > report.at
    # The status statement selects exactly what FlowControl lists.
    assert list(report.pauses) == await flow.pauses(conn)
    assert list(report.breakers) == await flow.breakers(conn)

    await flow.resume(conn, everything=True)
    await flow.reset_breaker(conn, welcome)
    report = await ADMIN.status(conn)
    assert [p.target for p in report.pauses] == ["scope globex", f"trigger {billing} (billing)"]
    assert welcome not in {b.trigger_id for b in report.breakers}


async def test_top_backlog_is_capped_at_ten(conn: asyncpg.Connection) -> None:
    for n in range(12):
        await add_trigger(conn, f"t{n:02d}", key_pattern=f"users/{n:02d}*")
    for n in range(12):
        await enqueue(conn, *[f"users/{n:02d}-{i}" for i in range(n + 1)])
    report = await ADMIN.status(conn)
    assert [t.total for t in report.top_backlog] == list(range(12, 2, -1))


async def test_list_abandoned(conn: asyncpg.Connection) -> None:
    old = await abandoned(conn, age=2 * DAY)
    ok = await abandoned(conn)
    failed = await abandoned(conn, outcome="failure", scope="globex")
    found = await ADMIN.list_abandoned(conn)
    assert [a.id for a in found] == [failed, ok, old]
    by_id = {a.id: a for a in found}
    assert (by_id[ok].outcome, by_id[ok].status, by_id[ok].result) == (
        "success",
        200,
        {"price": 12.5},
    )
    assert (by_id[failed].outcome, by_id[failed].result) == ("failure", None)
    assert by_id[failed].error == "timeout: no reply in 5s"
    assert by_id[ok].reply_to == "inbox:host-1:17"
    assert [a.id for a in await ADMIN.list_abandoned(conn, since=DAY)] == [failed, ok]
    now = await db_now(conn)
    assert [a.id for a in await ADMIN.list_abandoned(conn, since=now - 3 * DAY)] == [
        failed,
        ok,
        old,
    ]
    assert [a.id for a in await ADMIN.list_abandoned(conn, scope="globex")] == [failed]
    assert [a.id for a in await ADMIN.list_abandoned(conn, 1)] == [failed]
    with pytest.raises(InvalidInput, match="since"):
        await ADMIN.list_abandoned(conn, since=datetime(2026, 1, 1))


async def test_operator_views(conn: asyncpg.Connection) -> None:
    triggers = await seed_outbox(conn)
    for row in await enqueue(conn, "users/b9"):  # one row per trigger, both parked
        await park(conn, row)
    ids = await seed_mix(conn)
    summary = await conn.fetch(
        """SELECT scope, trigger_name, reason, resolution, count, oldest <= newest AS ordered
        FROM dispatcher.dead_letter_summary ORDER BY 1, 2, 3, 4"""
    )
    assert [tuple(r) for r in summary] == [
        ("acme", "billing", "handler_error", "handler_failed", 1, True),
        ("acme", "billing", "permanent", "replayed", 1, True),
        ("acme", "welcome", "handler_error", "open", 1, True),
        ("acme", "welcome", "timeout", "open", 1, True),
        ("globex", "welcome", "timeout", "discarded", 1, True),
    ]
    assert ids  # seeded
    lag = await conn.fetch(
        """SELECT scope, trigger_name, due_now, scheduled, leased, parked, oldest_due_seconds
        FROM dispatcher.outbox_lag ORDER BY trigger_name"""
    )
    assert [tuple(r)[:6] for r in lag] == [
        ("acme", "billing", 0, 1, 1, 1),
        ("acme", "welcome", 3, 1, 1, 1),
    ]
    # The view and `status` count the same way.
    o = (await ADMIN.status(conn)).outbox
    assert (o.due_now, o.scheduled, o.leased, o.parked) == tuple(
        sum(r[k] for r in lag) for k in ("due_now", "scheduled", "leased", "parked")
    )
    assert 60 <= lag[1]["oldest_due_seconds"] < 120
    assert lag[0]["oldest_due_seconds"] == 0
    assert triggers


async def test_views_downgrade_and_custom_schema(empty_dsn: str) -> None:
    schema = "ops_views"
    await migrate(empty_dsn, schema=schema)
    conn = await asyncpg.connect(empty_dsn)
    views = f"SELECT count(*) FROM pg_views WHERE schemaname = '{schema}'"
    try:
        assert await conn.fetchval(views) == 2
        t = await add_trigger(conn, "welcome", schema=schema)
        dl = await dead_letter(conn, trigger_id=t, schema=schema)
        admin = Admin(schema=schema)
        assert (await admin.status(conn)).dead_letters_by_resolution[Resolution.OPEN] == 1
        report = await admin.replay(conn, DeadLetterFilter(ids=(dl,)))
        assert len(report.replayed) == 1
        assert await conn.fetchval(f"SELECT sum(due_now) FROM {schema}.outbox_lag") == 1
        parked = await conn.fetchval(f"SELECT id FROM {schema}.outbox")
        await park(conn, parked, schema=schema)
        lag = f"SELECT * FROM {schema}.outbox_lag"
        [row] = await conn.fetch(lag)
        assert (row["due_now"], row["scheduled"], row["parked"]) == (0, 0, 1)

        # 0004 down: the 0002 view again, parked rows counted as scheduled.
        await downgrade(empty_dsn, "0003", schema=schema)
        [row] = await conn.fetch(lag)
        assert list(row.keys()) == [
            "scope", "trigger_name", "due_now", "scheduled", "leased", "oldest_due_seconds"
        ]  # fmt: skip
        assert (row["due_now"], row["scheduled"]) == (0, 1)
        await migrate(empty_dsn, schema=schema)
        [row] = await conn.fetch(lag)
        assert (row["scheduled"], row["parked"]) == (0, 1)
        await downgrade(empty_dsn, "0001", schema=schema)
        assert await conn.fetchval(views) == 0
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.dead_letters") == 1
        await migrate(empty_dsn, schema=schema)
        assert await conn.fetchval(views) == 2
    finally:
        await conn.close()


async def test_replayed_letter_runs_again_through_the_dispatcher(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    fixed = False
    runs: list[tuple[str, int]] = []

    @handlers.handler("flaky")
    async def flaky(ctx: HandlerContext) -> None:
        runs.append((ctx.idempotency_key, ctx.attempt))
        if not fixed:
            raise RuntimeError("downstream is down")

    fast = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=2)
    await add_trigger(conn, "flaky", target="flaky", retry=fast)
    await enqueue(conn, "users/1")
    config = DispatcherConfig(poll_interval=0.05, grace_period=5)
    await Dispatcher(dsn, handlers, config=config).run_until_idle(include_scheduled=True)
    [letter] = await ADMIN.list_dead_letters(conn)
    assert (letter.resolution, letter.attempts) == (Resolution.OPEN, 2)

    fixed = True
    report = await ADMIN.replay(conn, DeadLetterFilter(ids=(letter.id,)))
    [replayed] = report.replayed
    await Dispatcher(dsn, handlers, config=config).run_until_idle(include_scheduled=True)
    assert len(runs) == 3
    # A new event, a fresh budget: attempt 1 again.
    assert runs[-1] == (f"{replayed.event_id}:{letter.trigger_id}", 1)
    assert await rows(conn, "outbox") == []
    detail = await ADMIN.show_dead_letter(conn, letter.id)
    assert (detail.replay_pending, detail.replay_dead_letter_id) == (False, None)
    assert len(await ADMIN.list_dead_letters(conn)) == 1
