"""Flow control from the command line (issue 7): pause, resume, parked list and unpark,
breakers list and reset, against real Postgres and real dispatchers; and the FlowControl
behaviour those commands rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import anyio
import asyncpg
import pytest
from cli_run import assert_error, ok, ok_json, run
from dead_letter_seed import add_trigger, enqueue, rows
from flow_seed import park, set_breaker

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    FlowControl,
    HandlerContext,
    HandlerRegistry,
    Mutation,
    Op,
    RetryPolicy,
    emit_many,
)
from dispatcher.core.errors import TriggerNotFound

pytestmark = pytest.mark.anyio

FAST = DispatcherConfig(poll_interval=0.05, breaker_threshold=0)


async def pauses(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in await conn.fetch(
            "SELECT scope, trigger_id, note FROM dispatcher.pauses ORDER BY id"
        )
    ]


async def put(conn: asyncpg.Connection, *keys: str, scope: str = "acme") -> None:
    await emit_many(
        conn, [Mutation(scope, "users", k, Op.PUT, {"k": k}) for k in keys], autocommit=True
    )


# --- pause and resume ---


async def test_pause_and_resume_each_kind_of_target(dsn: str, conn: asyncpg.Connection) -> None:
    welcome = await add_trigger(conn, "welcome")
    billing = await add_trigger(conn, "billing")

    out = await ok("pause", "--dsn", dsn, "--scope", "globex", "--note", "tenant move")
    assert out.stdout == "paused scope globex; note: tenant move\n"
    out = await ok("pause", "--dsn", dsn, "--trigger", str(welcome))
    assert out.stdout == f"paused trigger {welcome} (welcome)\n"
    out = await ok("pause", "--dsn", dsn, "--trigger", "acme/billing", "--note", "bad deploy")
    assert out.stdout == f"paused trigger {billing} (billing); note: bad deploy\n"
    assert (await ok("pause", "--dsn", dsn, "--all")).stdout == "paused everything\n"
    # Pausing what is paused replaces the note, nothing more.
    await ok("pause", "--dsn", dsn, "--scope", "globex", "--note", "tenant move, day 2")
    assert await pauses(conn) == [
        ("globex", None, "tenant move, day 2"),
        (None, welcome, None),
        (None, billing, "bad deploy"),
        (None, None, None),
    ]
    shown = (await ok_json("status", "--dsn", dsn))["pauses"]
    assert [(p["scope"], p["trigger_id"], p["trigger_name"], p["note"]) for p in shown] == [
        ("globex", None, None, "tenant move, day 2"),
        (None, welcome, "welcome", None),
        (None, billing, "billing", "bad deploy"),
        (None, None, None, None),
    ]

    out = await ok("resume", "--dsn", dsn, "--trigger", "acme/welcome")
    assert out.stdout == f"resumed trigger {welcome} (welcome)\n"
    assert (await ok("resume", "--dsn", dsn, "--trigger", str(billing))).stdout == (
        f"resumed trigger {billing} (billing)\n"
    )
    # --all lifts the pause of everything, not the others.
    assert (await ok("resume", "--dsn", dsn, "--all")).stdout == "resumed everything\n"
    assert await pauses(conn) == [("globex", None, "tenant move, day 2")]
    line = assert_error(await run("resume", "--dsn", dsn, "--all"))
    assert line == "Error: everything is not paused (paused now: scope globex)"
    await ok("resume", "--dsn", dsn, "--scope", "globex")
    line = assert_error(await run("resume", "--dsn", dsn, "--scope", "globex"))
    assert line == "Error: scope globex is not paused (nothing is paused)"
    assert await pauses(conn) == []
    # A pause outlives its trigger, and can still be lifted by id.
    await ok("pause", "--dsn", dsn, "--trigger", str(billing))
    await ok("triggers", "remove", "--dsn", dsn, str(billing))
    line = assert_error(await run("resume", "--dsn", dsn, "--trigger", "acme/billing"))
    assert line == "Error: no trigger 'acme/billing'"
    out = await ok("resume", "--dsn", dsn, "--trigger", str(billing))
    assert out.stdout == f"resumed trigger {billing}\n"
    assert await pauses(conn) == []


async def test_pause_holds_rows_in_running_dispatchers_until_resumed(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    seen: list[str] = []

    @handlers.handler("run_welcome")
    async def welcome(ctx: HandlerContext) -> None:
        seen.append(str(ctx.event["key"]))

    await add_trigger(conn, "welcome")
    await ok("pause", "--dsn", dsn, "--trigger", "acme/welcome")
    await put(conn, "users/1", "users/2", "users/3")
    stats = await Dispatcher(dsn, handlers, config=FAST).run_until_idle()
    assert (stats.executed, seen) == (0, [])
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 3

    await ok("resume", "--dsn", dsn, "--trigger", "acme/welcome")
    await Dispatcher(dsn, handlers, config=FAST).run_until_idle()
    assert sorted(seen) == ["users/1", "users/2", "users/3"]
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0


TARGET_USAGE: list[tuple[list[str], str]] = [
    (["pause"], "give exactly one of --scope, --trigger or --all"),
    (["pause", "--scope", "acme", "--all"], "(got --scope and --all)"),
    (["pause", "--scope", "acme", "--trigger", "1"], "(got --scope and --trigger)"),
    (["resume"], "give exactly one of --scope, --trigger or --all"),
    (["parked", "unpark"], "give exactly one of --scope, --trigger or --all"),
    (["parked", "unpark", "--trigger", "1", "--scope", "acme"], "(got --scope and --trigger)"),
    (["pause", "--trigger", "welcome"], "expected a trigger id (e.g. 7) or SCOPE/NAME"),
    (["pause", "--trigger", "0"], "--trigger"),
    (["pause", "--trigger", "/welcome"], "--trigger"),
    (["resume", "--trigger", "acme/"], "--trigger"),
    (["parked", "list", "--trigger", "-3"], "--trigger"),
    (["parked", "list", "--limit", "0"], "--limit"),
    (["parked", "unpark", "--all", "--limit", "10001"], "--limit"),
    (["breakers", "reset"], "TRIGGER_ID"),
    (["breakers", "reset", "x"], "TRIGGER_ID"),
    (["breakers", "list", "--state", "open"], "--state"),
]


@pytest.mark.parametrize(("args", "mention"), TARGET_USAGE)
async def test_flow_usage_errors(
    dsn: str, conn: asyncpg.Connection, args: list[str], mention: str
) -> None:
    await add_trigger(conn, "welcome")
    assert_error(await run(*args, "--dsn", dsn), code=2, contains=mention)
    assert await pauses(conn) == []


async def test_flow_failures_are_one_line_errors(dsn: str, conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome")
    cases = [
        (["pause", "--trigger", "424242"], "Error: no trigger 424242"),
        (["pause", "--trigger", "acme/nope"], "Error: no trigger 'acme/nope'"),
        (["pause", "--scope", ""], "Error: invalid scope='': must not be empty"),
        (["resume", "--trigger", "acme/nope"], "Error: no trigger 'acme/nope'"),
        (["parked", "list", "--trigger", "acme/nope"], "Error: no trigger 'acme/nope'"),
        (["parked", "unpark", "--trigger", "globex/welcome"], "Error: no trigger 'globex/welcome'"),
        (
            ["breakers", "reset", str(t)],
            f"Error: trigger {t} (welcome) has no breaker (it never counted a failure)",
        ),
        (["breakers", "reset", "acme/nope"], "Error: no trigger 'acme/nope'"),
    ]
    for args, message in cases:
        assert assert_error(await run(*args, "--dsn", dsn)) == message, args
    assert await pauses(conn) == []
    for args in (["pause", "--all"], ["parked", "list"], ["breakers", "list"]):
        line = assert_error(await run(*args, "--dsn", "postgresql://u:s3cret@127.0.0.1:1/x"))
        assert line.startswith("Error: cannot reach Postgres")
        assert "s3cret" not in line
        assert_error(
            await run(*args, "--dsn", dsn, "--schema", "elsewhere"),
            contains="Run `dispatcher migrate` (with the same --schema) first",
        )


# --- parked rows ---


async def seed_parked(conn: asyncpg.Connection) -> dict[str, Any]:
    """Parked rows of acme/welcome (3), acme/billing (2) and globex/welcome (1), in id order,
    plus one acme/welcome row that is not parked."""
    welcome = await add_trigger(conn, "welcome")
    billing = await add_trigger(conn, "billing", key_pattern="users/b*")
    g_welcome = await add_trigger(conn, "welcome", scope="globex")
    w = await enqueue(conn, "users/a1", "users/a2", "users/a3", "users/a4")
    wb = await enqueue(conn, "users/b1", "users/b2")  # welcome and billing each
    [g] = await enqueue(conn, "users/g1", scope="globex")
    for row in w[:3]:
        await park(conn, row, attempts=2)
    for row in wb[1::2]:  # billing's rows
        await park(conn, row, reason="permission_denied")
    await park(conn, g)
    return {
        "welcome": welcome,
        "billing": billing,
        "g_welcome": g_welcome,
        "welcome_rows": w[:3],
        "billing_rows": wb[1::2],
        "globex_rows": [g],
        "not_parked": [w[3], *wb[::2]],
    }


LIST_FILTERS: list[tuple[list[str], list[str]]] = [
    ([], ["welcome_rows", "billing_rows", "globex_rows"]),
    (["--scope", "acme"], ["welcome_rows", "billing_rows"]),
    (["--trigger", "acme/billing"], ["billing_rows"]),
    (["--trigger", "globex/welcome"], ["globex_rows"]),
    (["--trigger", "acme/welcome", "--scope", "acme"], ["welcome_rows"]),
    (["--trigger", "acme/welcome", "--scope", "globex"], []),
]


@pytest.mark.parametrize(("args", "groups"), LIST_FILTERS)
async def test_parked_list_filters(
    dsn: str, conn: asyncpg.Connection, args: list[str], groups: list[str]
) -> None:
    seeded = await seed_parked(conn)
    found = await ok_json("parked", "list", "--dsn", dsn, *args)
    assert [r["id"] for r in found] == sorted(i for g in groups for i in seeded[g])


async def test_parked_list_fields_table_and_limit(dsn: str, conn: asyncpg.Connection) -> None:
    seeded = await seed_parked(conn)
    found = await ok_json("parked", "list", "--dsn", dsn, "--trigger", str(seeded["billing"]))
    assert [r["id"] for r in found] == seeded["billing_rows"]
    first = found[0]
    assert set(first) == {
        "id", "event_id", "trigger_id", "scope", "trigger_name", "attempts", "parked_at",
        "reason", "last_error",
    }  # fmt: skip
    assert (first["trigger_id"], first["scope"], first["trigger_name"]) == (
        seeded["billing"],
        "acme",
        "billing",
    )
    assert (first["reason"], first["attempts"]) == ("permission_denied", 1)
    assert first["last_error"]["message"] == "no handler registered for run_billing"

    limited = await ok_json("parked", "list", "--dsn", dsn, "--limit", "2")
    assert [r["id"] for r in limited] == seeded["welcome_rows"][:2]

    text = (await ok("parked", "list", "--dsn", dsn, "--scope", "acme")).stdout
    assert text.splitlines()[-1] == "5 parked row(s)"
    table = [ln.split() for ln in text.splitlines()]
    assert [str(seeded["welcome_rows"][0]), "acme", str(seeded["welcome"]), "welcome"] in [
        ln[:4] for ln in table
    ]
    assert "no handler registered for run_welcome" in text
    text = (await ok("parked", "list", "--dsn", dsn, "--limit", "2")).stdout
    assert text.splitlines()[-1] == "2 parked row(s) (the --limit: there may be more)"
    empty = (await ok("parked", "list", "--dsn", dsn, "--scope", "initech")).stdout
    assert empty.splitlines()[-1] == "0 parked row(s)"


async def test_unpark_dry_run_changes_nothing_then_unparks(
    dsn: str, conn: asyncpg.Connection
) -> None:
    seeded = await seed_parked(conn)
    before = await rows(conn, "outbox")
    for args, expected in (
        (["--scope", "acme"], "dry run: would un-park 5 parked row(s)\n"),
        (["--all"], "dry run: would un-park 6 parked row(s)\n"),
        (["--trigger", str(seeded["g_welcome"])], "dry run: would un-park 1 parked row(s)\n"),
        (
            ["--trigger", "acme/welcome", "--limit", "2"],
            "dry run: would un-park 2 parked row(s) (the --limit: run again for more)\n",
        ),
        (["--scope", "initech"], "dry run: would un-park 0 parked row(s)\n"),
    ):
        assert (await ok("parked", "unpark", "--dsn", dsn, *args, "--dry-run")).stdout == expected
    assert await rows(conn, "outbox") == before

    out = await ok("parked", "unpark", "--dsn", dsn, "--trigger", "acme/welcome", "--limit", "2")
    assert out.stdout == "un-parked 2 (the --limit: run again for more)\n"
    state = {
        r["id"]: r
        for r in await conn.fetch(
            """SELECT id, parked_at, parked_reason, attempts, due_at <= clock_timestamp() AS due
            FROM dispatcher.outbox"""
        )
    }
    oldest, second, third = seeded["welcome_rows"]
    for row in (oldest, second):  # oldest first; due now, attempts kept
        assert (state[row]["parked_at"], state[row]["parked_reason"]) == (None, None)
        assert (state[row]["due"], state[row]["attempts"]) == (True, 2)
    still = [r for r, s in state.items() if s["parked_at"] is not None]
    assert sorted(still) == sorted([third, *seeded["billing_rows"], *seeded["globex_rows"]])

    assert (await ok("parked", "unpark", "--dsn", dsn, "--scope", "acme")).stdout == (
        "un-parked 3\n"
    )
    assert (await ok("parked", "unpark", "--dsn", dsn, "--all", "--dry-run")).stdout == (
        "dry run: would un-park 1 parked row(s)\n"
    )
    assert (await ok("parked", "unpark", "--dsn", dsn, "--all")).stdout == "un-parked 1\n"
    assert (await ok("parked", "unpark", "--dsn", dsn, "--all")).stdout == "un-parked 0\n"
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 9
    assert await conn.fetchval(
        "SELECT count(*) FROM dispatcher.outbox WHERE parked_at IS NOT NULL OR due_at = 'infinity'"
    ) == 0  # fmt: skip


async def test_unpark_dry_run_api_counts_what_unpark_then_takes(
    conn: asyncpg.Connection,
) -> None:
    seeded = await seed_parked(conn)
    flow = FlowControl()
    before = await rows(conn, "outbox")
    cases: list[dict[str, Any]] = [
        {},
        {"scope": "acme"},
        {"trigger_id": seeded["billing"]},
        {"trigger_id": seeded["welcome"], "scope": "globex"},
        {"limit": 4},
    ]
    counts = [await flow.unpark(conn, dry_run=True, **kw) for kw in cases]
    assert counts == [6, 5, 2, 0, 4]
    assert await rows(conn, "outbox") == before
    assert await flow.unpark(conn, scope="acme", limit=4, dry_run=True) == 4
    assert await flow.unpark(conn, scope="acme", limit=4) == 4
    assert await flow.unpark(conn, scope="acme", dry_run=True) == 1


async def test_cli_and_status_see_rows_a_dispatcher_parked(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await ok(
        "triggers", "add", "--dsn", dsn, "--scope", "acme", "--name", "later",
        "--namespace", "users", "--pattern", "later/*", "--target", "not.deployed",
        "--registered-by", "user:7", "--park-on", "target_not_found", "--max-attempts", "3",
    )  # fmt: skip
    await put(conn, "later/1", "later/2", "later/3")
    handlers = HandlerRegistry()
    stats = await Dispatcher(dsn, handlers, config=FAST).run_until_idle(include_scheduled=True)
    assert stats.parked == 3
    outbox = (await ok_json("status", "--dsn", dsn))["outbox"]
    assert (outbox["parked"], outbox["scheduled"], outbox["due_now"]) == (3, 0, 0)
    found = await ok_json("parked", "list", "--dsn", dsn, "--trigger", "acme/later")
    assert [(r["reason"], r["last_error"]["kind"]) for r in found] == [
        ("target_not_found", "target_not_found")
    ] * 3
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters") == 0

    # Deploy the target; un-park one by command, and its success un-parks its siblings.
    done: list[str] = []

    @handlers.handler("not.deployed")
    async def deployed(ctx: HandlerContext) -> None:
        done.append(str(ctx.event["key"]))

    out = await ok("parked", "unpark", "--dsn", dsn, "--trigger", "acme/later", "--limit", "1")
    assert out.stdout == "un-parked 1 (the --limit: run again for more)\n"
    await Dispatcher(dsn, handlers, config=FAST).run_until_idle(include_scheduled=True)
    assert sorted(done) == ["later/1", "later/2", "later/3"]
    assert (await ok_json("status", "--dsn", dsn))["outbox"]["parked"] == 0
    assert await ok_json("parked", "list", "--dsn", dsn) == []
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0


# --- breakers ---


async def test_breakers_list_and_reset(dsn: str, conn: asyncpg.Connection) -> None:
    assert (await ok("breakers", "list", "--dsn", dsn)).stdout == (
        "all breakers closed, no failures counted\n"
    )
    assert await ok_json("breakers", "list", "--dsn", dsn) == []
    welcome = await add_trigger(conn, "welcome")
    billing = await add_trigger(conn, "billing")
    audit = await add_trigger(conn, "audit")
    calm = await add_trigger(conn, "calm")
    [probe, *_] = await enqueue(conn, "users/1")
    await set_breaker(conn, welcome, state="open", failures=3, open_for=60, opened_count=2)
    await set_breaker(conn, billing, state="closed", failures=1)
    await set_breaker(conn, audit, state="half_open", failures=3, probe_id=probe, opened_count=1)
    await set_breaker(conn, calm, state="closed", failures=0)

    found = await ok_json("breakers", "list", "--dsn", dsn)
    assert [(b["trigger_id"], b["trigger_name"], b["state"], b["failures"]) for b in found] == [
        (audit, "audit", "half_open", 3),
        (billing, "billing", "closed", 1),
        (welcome, "welcome", "open", 3),
    ]
    assert set(found[0]) == {
        "trigger_id", "scope", "trigger_name", "state", "failures", "open_until", "probe_id",
        "opened_count", "updated_at", "held_until",
    }  # fmt: skip
    assert (found[0]["probe_id"], found[0]["open_until"]) == (probe, None)
    assert (found[2]["opened_count"], found[2]["open_until"] is not None) == (2, True)
    text = (await ok("breakers", "list", "--dsn", dsn)).stdout
    table = [ln.split() for ln in text.splitlines()]
    assert [str(welcome), "acme", "welcome", "open", "3"] in [ln[:5] for ln in table]
    assert [str(audit), "acme", "audit", "half_open", "3"] in [ln[:5] for ln in table]
    assert str(calm) not in [ln[0] for ln in table if ln]
    assert text.splitlines()[-1] == "3 breaker(s) not closed or counting failures"

    out = await ok("breakers", "reset", "--dsn", dsn, str(welcome))
    assert out.stdout == f"breaker of trigger {welcome} (welcome) reset: closed\n"
    out = await ok("breakers", "reset", "--dsn", dsn, "acme/audit")
    assert out.stdout == f"breaker of trigger {audit} (audit) reset: closed\n"
    reset = await conn.fetch(
        """SELECT state, failures, open_until, probe_id FROM dispatcher.breakers
        WHERE trigger_id = ANY ($1::bigint[])""",
        [welcome, audit],
    )
    assert [tuple(r) for r in reset] == [("closed", 0, None, None)] * 2
    assert [b["trigger_id"] for b in await ok_json("breakers", "list", "--dsn", dsn)] == [billing]


async def test_reset_releases_the_rows_an_opened_breaker_held(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    healthy = False
    seen: list[str] = []

    @handlers.handler("run_welcome")
    async def welcome(ctx: HandlerContext) -> None:
        if not healthy:
            raise ConnectionError("smtp down")
        seen.append(str(ctx.event["key"]))

    fast = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=50)
    await add_trigger(conn, "welcome", retry=fast)
    await put(conn, *[f"users/{i}" for i in range(5)])
    config = DispatcherConfig(
        poll_interval=0.05, concurrency=1, breaker_threshold=3, breaker_cooldown=3600
    )
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle()
    assert stats.breakers_opened == 1
    [breaker] = await ok_json("breakers", "list", "--dsn", dsn)
    assert breaker["state"] == "open"
    # The opening moved the waiting rows to the end of the hour-long cool-down.
    held = "SELECT count(*) FROM dispatcher.outbox WHERE due_at > clock_timestamp() + '50 min'"
    assert await conn.fetchval(held) == 5

    healthy = True
    await ok("breakers", "reset", "--dsn", dsn, "acme/welcome")
    assert await conn.fetchval(held) == 0
    await Dispatcher(dsn, handlers, config=config).run_until_idle()
    assert sorted(seen) == [f"users/{i}" for i in range(5)]
    assert await ok_json("breakers", "list", "--dsn", dsn) == []


async def test_reset_moves_only_the_held_rows(conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome", key_pattern="users/w*")
    other = await add_trigger(conn, "other", key_pattern="users/o*")
    await set_breaker(conn, t, state="open", failures=0, open_for=600, opened_count=1)
    held, later, leased, parked_row = await enqueue(
        conn, "users/w1", "users/w2", "users/w3", "users/w4"
    )
    [other_row] = await enqueue(conn, "users/o1")
    until = "(SELECT open_until FROM dispatcher.breakers WHERE trigger_id = $2)"
    for row, extra in ((held, ""), (leased, ", lease_token = gen_random_uuid()"), (other_row, "")):
        await conn.execute(
            f"UPDATE dispatcher.outbox SET due_at = {until}{extra} WHERE id = $1", row, t
        )
    await conn.execute(
        "UPDATE dispatcher.outbox SET due_at = clock_timestamp() + '2 hours' WHERE id = $1", later
    )
    await park(conn, parked_row)
    due_times = "SELECT id, due_at FROM dispatcher.outbox"
    before = dict(await conn.fetch(due_times))

    assert await FlowControl().reset_breaker(conn, t)
    after = dict(await conn.fetch(due_times))
    assert {i for i in before if after[i] != before[i]} == {held}
    assert after[held] <= await conn.fetchval("SELECT clock_timestamp()")
    breaker = await conn.fetchrow("SELECT * FROM dispatcher.breakers WHERE trigger_id = $1", t)
    assert (breaker["state"], breaker["open_until"]) == ("closed", None)
    assert not await FlowControl().reset_breaker(conn, other)  # it never had a breaker


# --- the API under the commands ---


async def test_pausing_an_unknown_trigger_raises_and_pauses_nothing(
    conn: asyncpg.Connection,
) -> None:
    flow = FlowControl()
    with pytest.raises(TriggerNotFound, match="no trigger 424242"):
        await flow.pause(conn, trigger_id=424242)
    assert await flow.pauses(conn) == []
    t = await add_trigger(conn, "welcome")
    paused = await flow.pause(conn, trigger_id=t, note="n")
    assert (paused.trigger_name, paused.target) == ("welcome", f"trigger {t} (welcome)")
    # A pause that outlives its trigger can still be lifted.
    await conn.execute("DELETE FROM dispatcher.triggers WHERE id = $1", t)
    assert await flow.resume(conn, trigger_id=t)


async def test_python_dash_m_flow_commands(dsn: str, conn: asyncpg.Connection) -> None:
    await add_trigger(conn, "welcome")

    async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", "dispatcher.cli", *args, "--dsn", dsn]
        with anyio.fail_after(60):
            return await anyio.run_process(cmd, check=False)

    paused = await cli("pause", "--trigger", "acme/welcome")
    assert paused.returncode == 0, paused.stderr.decode()
    listed = await cli("breakers", "list", "--json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])
    missing = await cli("breakers", "reset", "424242")
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == (
        "Error: trigger 424242 has no breaker (it never counted a failure)"
    )
    tid = await conn.fetchval("SELECT id FROM dispatcher.triggers")
    assert await pauses(conn) == [(None, tid, None)]
