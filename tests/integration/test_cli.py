"""Every operator command of the CLI against real Postgres: exit codes, JSON output, dry
runs, and bad input reported in one line without a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, timedelta
from pathlib import Path

import anyio
import asyncpg
import pytest
from cli_run import assert_error, ok, ok_json, run
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

from dispatcher import Mutation, Op, emit
from dispatcher.core.models import RetryPolicy
from dispatcher.flow import FlowControl

pytestmark = pytest.mark.anyio

DAY = timedelta(days=1)
REPO = Path(__file__).resolve().parents[2]


async def seed(conn: asyncpg.Connection) -> dict[str, int]:
    welcome = await add_trigger(conn, "welcome")
    billing = await add_trigger(conn, "billing")
    return {
        "welcome": welcome,
        "billing": billing,
        "a": await dead_letter(conn, trigger_id=welcome, age=timedelta(hours=1)),
        "b": await dead_letter(conn, trigger_id=welcome, reason="timeout", age=3 * DAY),
        "c": await dead_letter(
            conn,
            trigger_id=billing,
            trigger_name="billing",
            reason="permanent",
            resolution="discarded",
            age=20 * DAY,
        ),
        "g": await dead_letter(
            conn, trigger_id=welcome, scope="globex", resolution="handler_failed", age=2 * DAY
        ),
    }


async def test_status_json_and_table(dsn: str, conn: asyncpg.Connection) -> None:
    ids = await seed(conn)
    # Both triggers match: users/1 -> rows 0 and 1, users/2 -> rows 2 and 3, users/3 -> 4, 5.
    outbox = await enqueue(conn, "users/1", "users/2", "users/3")
    for row in outbox[:2]:
        await set_state(conn, row, due_in=-30)
    for row in outbox[2:4]:
        await set_state(conn, row, due_in=600)
    await park(conn, outbox[4], reason="permission_denied")
    await park(conn, outbox[5])
    await abandoned(conn)
    flow = FlowControl()
    await flow.pause(conn, scope="globex", note="tenant migration")
    await set_breaker(conn, ids["billing"], state="open", failures=3, open_for=60, opened_count=1)

    report = await ok_json("status", "--dsn", dsn)
    assert report["outbox"] == {
        "due_now": 2,
        "scheduled": 2,
        "leased": 0,
        "parked": 2,
        "oldest_due_seconds": pytest.approx(30, abs=30),
    }
    assert report["dead_letters_by_resolution"] == {
        "open": 2,
        "handled": 0,
        "handler_failed": 1,
        "replayed": 0,
        "discarded": 1,
    }
    assert report["unresolved_by_reason"] == {"handler_error": 2, "timeout": 1}
    assert [(t["trigger_id"], t["total"], t["parked"]) for t in report["top_backlog"]] == [
        (ids["welcome"], 3, 1),
        (ids["billing"], 3, 1),
    ]
    assert report["abandoned_executions"] == 1
    [paused] = report["pauses"]
    assert (paused["scope"], paused["trigger_id"], paused["note"]) == (
        "globex",
        None,
        "tenant migration",
    )
    [breaker] = report["breakers"]
    assert (breaker["trigger_id"], breaker["trigger_name"], breaker["state"]) == (
        ids["billing"],
        "billing",
        "open",
    )
    assert breaker["open_until"] > report["at"]  # ISO 8601, both UTC: ordered as text

    text = (await ok("status", "--dsn", dsn)).stdout
    assert "due now" in text
    assert "handler_failed" in text
    assert "abandoned executions: 1" in text
    assert [ln.split() for ln in text.splitlines() if ln.startswith(("scheduled", "parked"))] == [
        ["scheduled", "later", "2"],
        ["parked", "2"],
    ]
    assert "scope globex" in text
    assert "tenant migration" in text
    assert [str(ids["billing"]), "acme", "billing", "open", "3"] in [
        ln.split()[:5] for ln in text.splitlines()
    ]
    assert "\x1b[" not in text  # no colour codes when not a terminal

    await flow.resume(conn, scope="globex")
    await flow.reset_breaker(conn, ids["billing"])
    calm = await ok_json("status", "--dsn", dsn)
    assert (calm["pauses"], calm["breakers"]) == ([], [])
    text = (await ok("status", "--dsn", dsn)).stdout
    assert "paused: nothing" in text
    assert "circuit breakers: all closed" in text


async def test_triggers_add_list_enable_disable_remove(dsn: str, conn: asyncpg.Connection) -> None:
    added = await ok(
        "triggers", "add", "--dsn", dsn, "--scope", "acme", "--name", "welcome",
        "--namespace", "users", "--pattern", "users/*", "--target", "send_welcome",
        "--registered-by", "user:7", "--ops", "put", "--retry-kind", "linear",
        "--base-delay", "2", "--factor", "1", "--max-delay", "20", "--jitter", "0",
        "--max-attempts", "4", "--max-event-age", "600", "--timeout", "12", "--disabled",
        "--park-on", "target_not_found", "--park-on", "permission_denied",
    )  # fmt: skip
    row = await conn.fetchrow("SELECT * FROM dispatcher.triggers WHERE name = 'welcome'")
    assert row is not None
    tid = row["id"]
    assert added.stdout.strip() == f"registered trigger {tid} (acme/welcome, disabled)"
    assert (row["enabled"], row["is_dead_letter_handler"], list(row["ops"])) == (
        False,
        False,
        ["put"],
    )
    assert (row["retry_kind"], row["max_attempts"], row["timeout"]) == ("linear", 4, 12.0)
    assert row["max_event_age"] == 600.0
    assert sorted(row["park_on"]) == ["permission_denied", "target_not_found"]

    await ok(
        "triggers", "add", "--dsn", dsn, "--scope", "acme", "--name", "on-dead",
        "--namespace", "users", "--pattern", "users/*", "--target", "alert",
        "--registered-by", "user:7", "--ops", "put,delete", "--dead-letter-handler",
    )  # fmt: skip
    listed = await ok_json("triggers", "list", "--dsn", dsn)
    assert [(t["name"], t["enabled"], t["is_dead_letter_handler"]) for t in listed] == [
        ("on-dead", True, True),
        ("welcome", False, False),
    ]
    assert listed[0]["ops"] == ["delete", "put"]
    expected_retry = {
        "kind": "linear",
        "base_delay": 2.0,
        "factor": 1.0,
        "max_delay": 20.0,
        "jitter": 0.0,
        "max_attempts": 4,
        "max_event_age": 600.0,
        "park_on": ["permission_denied", "target_not_found"],
    }
    assert {k: listed[1]["retry"][k] for k in expected_retry} == expected_retry
    assert (listed[0]["retry"]["park_on"], listed[0]["retry"]["max_event_age"]) == ([], None)
    assert await ok_json("triggers", "list", "--dsn", dsn, "--scope", "globex") == []
    table = (await ok("triggers", "list", "--dsn", dsn)).stdout
    assert "send_welcome" in table
    assert "age<=600s park_on=permission_denied,target_not_found" in table
    assert "2 trigger(s)" in table

    assert "enabled" in (await ok("triggers", "enable", "--dsn", dsn, str(tid))).stdout
    assert await conn.fetchval("SELECT enabled FROM dispatcher.triggers WHERE id = $1", tid)
    assert "disabled" in (await ok("triggers", "disable", "--dsn", dsn, str(tid))).stdout
    assert not await conn.fetchval("SELECT enabled FROM dispatcher.triggers WHERE id = $1", tid)
    await ok("triggers", "remove", "--dsn", dsn, str(tid))
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.triggers WHERE id = $1", tid) == 0
    for action in ("remove", "enable", "disable"):
        assert_error(
            await run("triggers", action, "--dsn", dsn, str(tid)), contains=f"no trigger {tid}"
        )


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--jitter", "7"], "retry.jitter"),
        (["--base-delay", "nan"], "retry.base_delay"),
        (["--max-attempts", "0"], "retry.max_attempts"),
        (["--timeout", "0"], "execution_timeout"),
        (["--pattern", "a**b"], "key_pattern"),
        (["--ops", "upsert"], "ops"),
        (["--name", "welcome"], "name"),  # already exists
        (["--max-event-age", "0"], "retry.max_event_age"),
    ],
)
async def test_triggers_add_rejects_bad_values_in_one_line(
    dsn: str, conn: asyncpg.Connection, extra: list[str], field: str
) -> None:
    await add_trigger(conn, "welcome")
    base = {
        "--scope": "acme",
        "--name": "other",
        "--namespace": "users",
        "--pattern": "users/*",
        "--target": "t",
        "--registered-by": "user:7",
    }
    args = ["triggers", "add", "--dsn", dsn, *extra]
    for option, value in base.items():
        if option not in extra:
            args += [option, value]
    assert_error(await run(*args), contains=f"invalid {field}=")
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.triggers") == 1


async def test_names_print_as_they_are(dsn: str, conn: asyncpg.Connection) -> None:
    await add_trigger(conn, "[bold]x[/bold]")
    assert "[bold]x[/bold]" in (await ok("triggers", "list", "--dsn", dsn)).stdout


LIST_FILTERS: list[tuple[list[str], str]] = [
    ([], "gcba"),
    (["--scope", "acme"], "cba"),
    (["--trigger", "acme/billing"], "c"),
    (["--trigger", "acme/welcome"], "ba"),
    (["--scope", "acme", "--trigger", "acme/welcome", "--reason", "timeout"], "b"),
    (["--reason", "timeout"], "b"),
    (["--resolution", "handler_failed"], "g"),
    (["--since", "5h"], "a"),
    (["--older-than", "2d12h"], "cb"),
    (["--scope", "acme", "--reason", "handler_error"], "a"),
    (["--limit", "2"], "gc"),
]


@pytest.mark.parametrize(("args", "expected"), LIST_FILTERS)
async def test_dead_letters_list_filters(
    dsn: str, conn: asyncpg.Connection, args: list[str], expected: str
) -> None:
    ids = await seed(conn)
    found = await ok_json("dead-letters", "list", "--dsn", dsn, *args)
    assert [d["id"] for d in found] == [ids[k] for k in expected]


async def test_dead_letters_trigger_is_an_id_or_scope_and_name(
    dsn: str, conn: asyncpg.Connection
) -> None:
    ids = await seed(conn)
    by_id = await ok_json("dead-letters", "list", "--dsn", dsn, "--trigger", str(ids["welcome"]))
    assert [d["id"] for d in by_id] == [ids["g"], ids["b"], ids["a"]]
    by_name = await ok_json("dead-letters", "list", "--dsn", dsn, "--trigger", "globex/welcome")
    assert [d["id"] for d in by_name] == [ids["g"]]
    # A trigger that exists but has no dead letters selects none; that is not an error.
    await add_trigger(conn, "sync-crm")
    assert await ok_json("dead-letters", "list", "--dsn", dsn, "--trigger", "acme/sync-crm") == []
    # A deleted trigger's letters keep its id and name, so it can still be named.
    await conn.execute("DELETE FROM dispatcher.triggers WHERE id = $1", ids["billing"])
    gone = await ok_json("dead-letters", "list", "--dsn", dsn, "--trigger", str(ids["billing"]))
    assert [d["id"] for d in gone] == [ids["c"]]


@pytest.mark.parametrize("command", ["list", "replay", "discard"])
@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ("acme/sync-crm", "Error: no trigger 'acme/sync-crm'"),
        ("globex/billing", "Error: no trigger 'globex/billing'"),
        ("424242", "Error: no trigger 424242"),
    ],
)
async def test_dead_letters_unknown_trigger_is_an_error(
    dsn: str, conn: asyncpg.Connection, command: str, trigger: str, message: str
) -> None:
    await seed(conn)
    before = await rows(conn, "dead_letters")
    line = assert_error(await run("dead-letters", command, "--dsn", dsn, "--trigger", trigger))
    assert line == message
    assert await rows(conn, "dead_letters") == before


async def test_dead_letters_trigger_refuses_a_bare_name_and_a_second_scope(dsn: str) -> None:
    assert_error(
        await run("dead-letters", "list", "--dsn", dsn, "--trigger", "welcome"),
        code=2,
        contains="'welcome': expected a trigger id (e.g. 7) or SCOPE/NAME",
    )
    line = assert_error(
        await run("dead-letters", "list", "--dsn", dsn, "--scope", "globex", "--trigger", "acme/x")
    )
    assert line == "Error: invalid trigger='acme/x': the filter already names scope 'globex'"


async def test_dead_letters_show_a_negative_id(dsn: str) -> None:
    for bad in ("-1", "0"):
        line = assert_error(await run("dead-letters", "show", "--dsn", dsn, bad))
        assert line == f"Error: no dead letter with id {bad}: dead-letter ids are positive"


async def test_dead_letters_list_by_trigger_id_and_iso_moments(
    dsn: str, conn: asyncpg.Connection
) -> None:
    ids = await seed(conn)
    found = await ok_json("dead-letters", "list", "--dsn", dsn, "--trigger-id", str(ids["billing"]))
    assert [d["id"] for d in found] == [ids["c"]]
    moment = await conn.fetchval("SELECT clock_timestamp() - interval '2 days 12 hours'")
    since = await ok_json("dead-letters", "list", "--dsn", dsn, "--since", moment.isoformat())
    assert [d["id"] for d in since] == [ids["g"], ids["a"]]
    # A naive datetime is read as UTC.
    naive_utc = moment.astimezone(UTC).replace(tzinfo=None)
    older = await ok_json(
        "dead-letters", "list", "--dsn", dsn, "--older-than", naive_utc.isoformat()
    )
    assert [d["id"] for d in older] == [ids["c"], ids["b"]]


async def test_dead_letters_list_table(dsn: str, conn: asyncpg.Connection) -> None:
    ids = await seed(conn)
    out = (await ok("dead-letters", "list", "--dsn", dsn, "--scope", "acme")).stdout
    assert "4 dead letter(s)" not in out
    assert "3 dead letter(s)" in out
    assert "ValueError: smtp refused #3" in out
    for k in "abc":
        assert str(ids[k]) in out


async def test_dead_letters_show(dsn: str, conn: asyncpg.Connection) -> None:
    ids = await seed(conn)
    detail = await ok_json("dead-letters", "show", "--dsn", dsn, str(ids["b"]))
    assert detail["id"] == ids["b"]
    assert detail["reason"] == "timeout"
    assert detail["resolution"] == "open"
    assert detail["payload"]["value"] == {"plan": "pro", "seats": 3}
    assert detail["policy"]["kind"] == "linear"
    assert [e["attempt"] for e in detail["errors"]] == [1, 2, 3]
    assert detail["errors"][0]["at"] == "2026-11-22T10:01:00.123456+00:00"
    assert detail["replayed_as"] is None

    text = (await ok("dead-letters", "show", "--dsn", dsn, str(ids["b"]))).stdout
    assert f"Dead letter {ids['b']}" in text
    assert "ValueError: smtp refused #2" in text
    assert '"seats": 3' in text

    assert_error(
        await run("dead-letters", "show", "--dsn", dsn, "999999"),
        contains="no dead letter with id 999999",
    )


async def test_replay_dry_run_then_for_real(dsn: str, conn: asyncpg.Connection) -> None:
    ids = await seed(conn)
    before = [await rows(conn, t) for t in ("dead_letters", "outbox")]
    dry = await ok_json("dead-letters", "replay", "--dsn", dsn, "--scope", "acme", "--dry-run")
    assert dry["dry_run"] is True
    assert [r["dead_letter_id"] for r in dry["replayed"]] == [ids["a"], ids["b"]]
    assert all(r["event_id"] is None for r in dry["replayed"])
    out = (await ok("dead-letters", "replay", "--dsn", dsn, "--scope", "acme", "--dry-run")).stdout
    assert "dry run: would replay 2 dead letter(s)" in out
    assert [await rows(conn, t) for t in ("dead_letters", "outbox")] == before

    real = await ok_json("dead-letters", "replay", "--dsn", dsn, "--scope", "acme")
    assert [r["dead_letter_id"] for r in real["replayed"]] == [ids["a"], ids["b"]]
    events = {uuid.UUID(r["event_id"]) for r in real["replayed"]}
    outbox = await conn.fetch("SELECT event_id, attempts FROM dispatcher.outbox")
    assert {r["event_id"] for r in outbox} == events
    assert {r["attempts"] for r in outbox} == {0}

    again = (await ok("dead-letters", "replay", "--dsn", dsn, str(ids["a"]))).stdout
    assert "already replayed as" in again
    assert "replayed 0 dead letter(s)" in again
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 2


async def test_replay_with_the_current_policy(dsn: str, conn: asyncpg.Connection) -> None:
    ids = await seed(conn)
    report = await ok_json(
        "dead-letters", "replay", "--dsn", dsn, str(ids["a"]), "--policy", "current"
    )
    [r] = report["replayed"]
    assert report["policy"] == "current"
    # add_trigger's policy, not the snapshot's.
    assert (r["policy"]["max_attempts"], r["timeout"]) == (8, 45.0)
    assert await conn.fetchval("SELECT max_attempts FROM dispatcher.outbox") == 8


async def test_replay_park_on_follows_the_policy_chosen(dsn: str, conn: asyncpg.Connection) -> None:
    t = await add_trigger(conn, "welcome", retry=RetryPolicy(park_on={"permission_denied"}))
    snapshot = SNAPSHOT_POLICY | {"park_on": ["target_not_found"]}
    first = await dead_letter(conn, trigger_id=t, policy=snapshot)
    second = await dead_letter(conn, trigger_id=t, policy=snapshot)
    original = await ok_json("dead-letters", "replay", "--dsn", dsn, str(first))
    current = await ok_json(
        "dead-letters", "replay", "--dsn", dsn, str(second), "--policy", "current"
    )
    assert original["replayed"][0]["policy"]["park_on"] == ["target_not_found"]
    assert current["replayed"][0]["policy"]["park_on"] == ["permission_denied"]
    stored = dict(await conn.fetch("SELECT event_id::text, park_on FROM dispatcher.outbox"))
    assert {k: list(v) for k, v in stored.items()} == {
        original["replayed"][0]["event_id"]: ["target_not_found"],
        current["replayed"][0]["event_id"]: ["permission_denied"],
    }


async def test_bulk_actions_refuse_an_empty_selection(dsn: str, conn: asyncpg.Connection) -> None:
    await seed(conn)
    for action in ("replay", "discard"):
        assert_error(await run("dead-letters", action, "--dsn", dsn), code=2, contains="--all")
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    out = (await ok("dead-letters", "replay", "--dsn", dsn, "--all")).stdout
    assert "replayed 3 dead letter(s)" in out


async def test_replay_unknown_id(dsn: str, conn: asyncpg.Connection) -> None:
    ids = await seed(conn)
    assert_error(
        await run("dead-letters", "replay", "--dsn", dsn, str(ids["a"]), "424242"),
        contains="no dead letter with id 424242",
    )
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0


async def test_discard(dsn: str, conn: asyncpg.Connection) -> None:
    ids = await seed(conn)
    before = await rows(conn, "dead_letters")
    welcome = str(ids["welcome"])
    out = await ok("dead-letters", "discard", "--dsn", dsn, "--trigger", welcome, "--dry-run")
    assert out.stdout.strip() == "dry run: would discard 3 dead letter(s)"
    assert await rows(conn, "dead_letters") == before
    out = await ok("dead-letters", "discard", "--dsn", dsn, "--trigger", welcome)
    assert out.stdout.strip() == "discarded 3"
    resolutions = dict(await conn.fetch("SELECT id, resolution FROM dispatcher.dead_letters"))
    assert resolutions == {
        ids["a"]: "discarded",
        ids["b"]: "discarded",
        ids["c"]: "discarded",
        ids["g"]: "discarded",
    }
    assert_error(
        await run("dead-letters", "discard", "--dsn", dsn, "--resolution", "replayed"),
        contains="only open or handler_failed dead letters can be discarded",
    )


async def test_purge(dsn: str, conn: asyncpg.Connection) -> None:
    ids = await seed(conn)  # c: discarded 10 days ago
    before = await rows(conn, "dead_letters")
    dry = await ok("dead-letters", "purge", "--dsn", dsn, "--older-than", "7d", "--dry-run")
    assert dry.stdout.strip() == "dry run: would purge 1 dead letter(s)"
    assert await rows(conn, "dead_letters") == before
    assert (await ok("dead-letters", "purge", "--dsn", dsn, "--older-than", "7d")).stdout == (
        "purged 1\n"
    )
    left = {r["id"] for r in await conn.fetch("SELECT id FROM dispatcher.dead_letters")}
    assert left == {ids["a"], ids["b"], ids["g"]}
    assert_error(await run("dead-letters", "purge", "--dsn", dsn), code=2, contains="--older-than")


async def test_abandoned_list(dsn: str, conn: asyncpg.Connection) -> None:
    old = await abandoned(conn, age=2 * DAY)
    new = await abandoned(conn, outcome="failure", scope="globex")
    found = await ok_json("abandoned", "list", "--dsn", dsn)
    assert [a["id"] for a in found] == [new, old]
    assert found[0]["error"] == "timeout: no reply in 5s"
    assert found[1]["result"] == {"price": 12.5}
    assert [a["id"] for a in await ok_json("abandoned", "list", "--dsn", dsn, "--since", "1d")] == [
        new
    ]
    scoped = await ok_json("abandoned", "list", "--dsn", dsn, "--scope", "acme")
    assert [a["id"] for a in scoped] == [old]
    text = (await ok("abandoned", "list", "--dsn", dsn)).stdout
    assert "2 abandoned execution(s)" in text
    assert "timeout: no reply in 5s" in text


BAD_USAGE: list[tuple[list[str], str]] = [
    (["dead-letters", "list", "--reason", "exploded"], "--reason"),
    (["dead-letters", "list", "--resolution", "closed"], "--resolution"),
    (["dead-letters", "list", "--since", "yesterday"], "--since"),
    (["dead-letters", "list", "--older-than", "7 days"], "--older-than"),
    (["dead-letters", "list", "--limit", "0"], "--limit"),
    (["dead-letters", "purge", "--older-than", "-1d"], "--older-than"),
    (["dead-letters", "show", "twelve"], "DEAD_LETTER_ID"),
    (["dead-letters", "replay", "--policy", "newest", "--all"], "--policy"),
    (["abandoned", "list", "--since", "1 hour"], "--since"),
    (["triggers", "enable", "x"], "TRIGGER_ID"),
    (["triggers", "add", "--park-on", "timeout"], "--park-on"),
    (["triggers", "add", "--max-event-age", "soon"], "--max-event-age"),
    (
        ["run", "--handlers", "examples.compose_handlers:handlers", "--redact-key", "-id"],
        "'--redact-key': invalid redact_keys='-id'",
    ),
]


@pytest.mark.parametrize(("args", "mention"), BAD_USAGE)
async def test_bad_options_are_usage_errors(dsn: str, args: list[str], mention: str) -> None:
    result = await run(*args, "--dsn", dsn)
    assert_error(result, code=2, contains=mention)


async def test_filter_values_click_accepts_but_the_api_refuses(dsn: str) -> None:
    line = assert_error(await run("dead-letters", "list", "--dsn", dsn, "--trigger-id", "0"))
    assert line == "Error: invalid trigger_id=0: must be a positive integer id"
    assert_error(
        await run("dead-letters", "list", "--dsn", dsn, "--since", "999999999w"),
        code=2,
        contains="--since",
    )


@pytest.mark.parametrize(
    ("dsn_value", "message"),
    [
        ("postgresql://nobody:s3cret@127.0.0.1:1/x", "Error: cannot reach Postgres"),
        ("postgresql://nobody:s3cret@[bad/x", "Error: invalid --dsn"),
        ("postgresql://nobody:s3cret@127.0.0.1:99999/x", "Error: invalid --dsn"),
        ("mysql://nobody:s3cret@a/b", "Error: invalid --dsn: invalid DSN: scheme"),
    ],
)
async def test_bad_dsns_are_one_line_errors(dsn_value: str, message: str) -> None:
    for args in (["status"], ["dead-letters", "list"], ["dead-letters", "show", "1"]):
        line = assert_error(await run(*args, "--dsn", dsn_value))
        assert line.startswith(message)
        assert "s3cret" not in line


async def test_missing_dsn_and_unmigrated_or_bad_schema(dsn: str) -> None:
    assert_error(await run("status"), code=2, contains="give --dsn or set DATABASE_URL")
    assert_error(
        await run("status", "--dsn", dsn, "--schema", "elsewhere"),
        contains="Run `dispatcher migrate` (with the same --schema) first",
    )
    assert_error(await run("status", "--dsn", dsn, "--schema", "Bad-Name"), contains="schema")


async def test_python_dash_m_entry_point(dsn: str, conn: asyncpg.Connection) -> None:
    """``python -m dispatcher.cli`` loads the admin commands too (no circular import)."""
    await seed(conn)

    async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", "dispatcher.cli", *args, "--dsn", dsn]
        with anyio.fail_after(60):
            return await anyio.run_process(cmd, check=False)

    listed = await cli("dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    assert len(json.loads(listed.stdout)) == 4
    missing = await cli("dead-letters", "show", "999999")
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == "Error: no dead letter with id 999999"
    assert missing.stdout == b""


async def test_run_redact_key_adds_name_fragments(dsn: str, conn: asyncpg.Connection) -> None:
    """``run --redact-key`` reaches the dispatcher's config: a dead letter's payload loses
    the values under the names added, and under the default ones still."""
    await add_trigger(conn, "vault", target="nowhere.to_be_found")  # dead-lettered at once
    payload = {"user": "ann", "customer_ssn": "1-2-3", "Internal-Ref": "r-9", "password": "pw"}
    await emit(conn, Mutation("acme", "users", "users/1", Op.PUT, payload), autocommit=True)
    command = [
        *(sys.executable, "-m", "dispatcher.cli", "run", "--dsn", dsn, "--poll-interval", "0.05"),
        *("--handlers", "examples.compose_handlers:handlers"),
        *("--redact-key", "SSN", "--redact-key", "internal_ref"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DISPATCH"))}
    env["PYTHONPATH"] = str(REPO)
    err = b""
    with anyio.fail_after(60):
        async with await anyio.open_process(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL
        ) as process:
            assert process.stderr is not None
            try:
                while b"row dead-lettered" not in err:
                    err += await process.stderr.receive()
            except anyio.EndOfStream:
                pytest.fail(f"dispatcher run stopped early: {err.decode()}")
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0, err.decode()
    [dead] = await conn.fetch("SELECT payload FROM dispatcher.dead_letters")
    assert json.loads(dead["payload"])["value"] == {
        "user": "ann",
        "customer_ssn": "[REDACTED]",
        "Internal-Ref": "[REDACTED]",
        "password": "[REDACTED]",
    }
