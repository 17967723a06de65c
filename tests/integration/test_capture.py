"""Table capture (migration 0011, ``dispatcher.capture``): the inserts, updates and deletes a
plain client makes on a captured host table become mutations in the writer's transaction.

Every writer here is another connection, asyncpg or psycopg, sending raw SQL: it knows
nothing of the library. What a commit leaves in the outbox (op, key, scope, value, old, the
trigger's policy snapshot), what a rollback leaves (nothing), the rows a writer may not write
(a null key or scope: its statement fails), hostile identifiers, partitions, what ``add``
refuses (changing nothing), ``remove``, migrations up and down, a writer with no grant on the
library's schema, and a dispatcher handing the rows to a handler.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schema_history import downgrade

from dispatcher import (
    Capture,
    CaptureNotFound,
    Captures,
    Dispatcher,
    DispatcherConfig,
    FlowControl,
    HandlerContext,
    HandlerRegistry,
    InvalidInput,
    RetryPolicy,
    TriggerRegistry,
    migrate,
)
from dispatcher.capture import KEY_TYPES
from dispatcher.core.errors import BACKLOG_FULL_SQLSTATE
from dispatcher.sql import POLICY_COLUMNS

pytestmark = pytest.mark.anyio

CAPTURES = Captures()
POLICY = ", ".join(POLICY_COLUMNS)
AUDIT = RetryPolicy(kind="linear", base_delay=2, factor=1, max_delay=60, max_attempts=7)
CAPTURE_ROW = "'dispatcher.capture_row()'::regprocedure"


# --- writers: other clients, raw SQL, their own transaction ---


class Refused(Exception):
    """A writer's statement failed: what Postgres said, the same for every driver."""

    def __init__(self, sqlstate: str, message: str, hint: str | None) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


async def by_asyncpg(dsn: str, statements: Sequence[str], rollback: bool = False) -> None:
    """Run ``statements`` in one transaction of a new asyncpg connection, then commit (or
    roll back)."""
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            for sql in statements:
                await conn.execute(sql)
        except asyncpg.PostgresError as exc:
            await tx.rollback()
            raise Refused(exc.sqlstate, exc.message, exc.hint) from None
        await (tx.rollback() if rollback else tx.commit())
    finally:
        await conn.close()


def _by_psycopg(dsn: str, statements: Sequence[str], rollback: bool) -> None:
    with psycopg.connect(dsn) as pg:
        try:
            for sql in statements:
                pg.execute(sql.encode())
        except psycopg.Error as exc:
            pg.rollback()
            raise Refused(
                exc.sqlstate or "", exc.diag.message_primary or "", exc.diag.message_hint
            ) from None
        if rollback:
            pg.rollback()
        else:
            pg.commit()


async def by_psycopg(dsn: str, statements: Sequence[str], rollback: bool = False) -> None:
    """The same through psycopg 3 (sync, in a worker thread, as a threaded server would)."""
    await anyio.to_thread.run_sync(_by_psycopg, dsn, statements, rollback)


Writer = Callable[..., Awaitable[None]]
WRITERS = [pytest.param(by_asyncpg, id="asyncpg"), pytest.param(by_psycopg, id="psycopg")]


# --- reading what was enqueued ---


async def trigger(
    conn: asyncpg.Connection,
    namespace: str = "accounts",
    scope: str = "acme",
    name: str | None = None,
    schema: str = "dispatcher",
    **kw: Any,
) -> int:
    """A trigger matching every key of ``namespace`` in ``scope``."""
    params: dict[str, Any] = {
        "scope": scope,
        "name": name or f"{namespace}-all",
        "namespace": namespace,
        "key_pattern": "*",
        "target": "sync",
        "registered_by": "user:7",
    }
    params.update(kw)
    return (await TriggerRegistry(schema=schema).register(conn, **params)).id


async def outbox(conn: asyncpg.Connection, schema: str = "dispatcher") -> list[dict[str, Any]]:
    """The outbox rows in the order they were written, payload decoded."""
    rows = await conn.fetch(
        "SELECT trigger_id, scope, trigger_name, target, registered_by, payload, depth,"
        f" {POLICY} FROM {schema}.outbox ORDER BY id"
    )
    return [{**r, "payload": json.loads(r["payload"])} for r in rows]


def changes(rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(op, scope, key, value, old) of each row."""
    return [
        (p["op"], r["scope"], p["key"], p["value"], p["old"]) for r in rows for p in [r["payload"]]
    ]


async def capture_triggers(conn: asyncpg.Connection) -> list[tuple[str, str, bytes]]:
    """Every trigger running capture_row, partitions' clones included."""
    rows = await conn.fetch(
        f"SELECT tgrelid::regclass::text AS rel, tgname, tgargs FROM pg_trigger"
        f" WHERE tgfoid = {CAPTURE_ROW} ORDER BY 1, 2"
    )
    return [(r["rel"], r["tgname"], bytes(r["tgargs"])) for r in rows]


async def count(conn: asyncpg.Connection, table: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))


# --- what a captured table's writes become ---


@pytest.mark.parametrize("write", WRITERS)
async def test_commits_become_mutations_and_rollbacks_nothing(
    write: Writer, dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "CREATE TABLE accounts (region text, id int, name text, balance numeric, tags text[],"
        " PRIMARY KEY (region, id))"
    )
    audit = await trigger(conn, retry=AUDIT)
    await trigger(conn, namespace="orders")  # another namespace: never matched
    await trigger(conn, scope="globex")  # another scope: never matched
    capture, outcome = await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
    assert outcome == "added"
    assert (capture.table, capture.keys, capture.key_prefix) == (
        "public.accounts",
        ("region", "id"),
        "accounts/",
    )
    assert (capture.scope, capture.scope_column, capture.enabled) == ("acme", None, True)

    insert = (
        "INSERT INTO accounts VALUES ('eu', 1, 'Zoë', 10.50, '{a,b}'), ('us', 2, NULL, 0, '{}')"
    )
    await write(dsn, [insert], rollback=True)
    assert await outbox(conn) == []
    assert await count(conn, "accounts") == 0

    await write(dsn, [insert])
    await write(dsn, ["UPDATE accounts SET balance = balance + 1 WHERE id = 1"])
    await write(dsn, ["DELETE FROM accounts WHERE id = 2"])
    # Rolled back after the committed ones: nothing more.
    await write(dsn, ["UPDATE accounts SET name = 'x'", "DELETE FROM accounts"], rollback=True)

    zoe = {"region": "eu", "id": 1, "name": "Zoë", "balance": 10.5, "tags": ["a", "b"]}
    us = {"region": "us", "id": 2, "name": None, "balance": 0, "tags": []}
    rows = await outbox(conn)
    assert changes(rows) == [
        ("put", "acme", "accounts/eu/1", zoe, None),
        ("put", "acme", "accounts/us/2", us, None),
        ("put", "acme", "accounts/eu/1", {**zoe, "balance": 11.5}, zoe),
        ("delete", "acme", "accounts/us/2", None, us),
    ]
    snapshot = dict(
        await conn.fetchrow(f"SELECT {POLICY} FROM dispatcher.triggers WHERE id = $1", audit)
    )
    for row in rows:
        p = row["payload"]
        assert (row["trigger_id"], row["trigger_name"], row["target"]) == (
            audit,
            "accounts-all",
            "sync",
        )
        assert (row["registered_by"], row["depth"], p["depth"]) == ("user:7", 0, 0)
        assert (p["namespace"], p["scope"], p["root"]) == ("accounts", "acme", p["event_id"])
        assert {c: row[c] for c in POLICY_COLUMNS} == snapshot
    assert (rows[0]["retry_kind"], rows[0]["max_attempts"]) == ("linear", 7)
    assert len({r["payload"]["event_id"] for r in rows}) == 4

    # A committed TRUNCATE empties the table and says nothing.
    await write(dsn, ["TRUNCATE accounts"])
    assert len(await outbox(conn)) == 4


@pytest.mark.parametrize("write", WRITERS)
async def test_scope_column_moves_and_multi_row_updates(
    write: Writer, dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "CREATE TABLE docs (id bigint PRIMARY KEY, tenant text NOT NULL, title text)"
    )
    acme = await trigger(conn, namespace="docs")
    globex = await trigger(conn, namespace="docs", scope="globex")
    await CAPTURES.add(conn, "docs", namespace="docs", scope_column="tenant", key_prefix="d:")

    await write(
        dsn, ["INSERT INTO docs VALUES (1, 'acme', 'a'), (2, 'acme', 'b'), (3, 'globex', 'c')"]
    )
    d1, d2, d3 = (
        {"id": 1, "tenant": "acme", "title": "a"},
        {"id": 2, "tenant": "acme", "title": "b"},
        {"id": 3, "tenant": "globex", "title": "c"},
    )
    # One statement, two rows: one mutation each.
    await write(dsn, ["UPDATE docs SET title = upper(title) WHERE tenant = 'acme'"])
    # Matching nothing: nothing.
    await write(
        dsn, ["UPDATE docs SET title = 'none' WHERE id = 99", "DELETE FROM docs WHERE id = 99"]
    )
    assert len(await outbox(conn)) == 5
    # The scope changes: a delete in the old scope, a put in the new one.
    await write(dsn, ["UPDATE docs SET tenant = 'globex' WHERE id = 1"])
    # The key changes: a delete of the old key, a put of the new one.
    await write(dsn, ["UPDATE docs SET id = 30 WHERE id = 3"])
    # Key and scope at once, for two rows in one statement.
    await write(dsn, ["UPDATE docs SET id = id + 100, tenant = 'acme' WHERE id IN (1, 30)"])
    # An update that changes nothing is still a write: a put whose old equals its value.
    await write(dsn, ["UPDATE docs SET title = title WHERE id = 2"])

    up1, up2 = {**d1, "title": "A"}, {**d2, "title": "B"}
    g1 = {**up1, "tenant": "globex"}
    d30 = {**d3, "id": 30}
    rows = await outbox(conn)
    expected = [
        ("put", "acme", "d:1", d1, None),
        ("put", "acme", "d:2", d2, None),
        ("put", "globex", "d:3", d3, None),
        ("put", "acme", "d:1", up1, d1),
        ("put", "acme", "d:2", up2, d2),
        ("delete", "acme", "d:1", None, up1),
        ("put", "globex", "d:1", g1, None),
        ("delete", "globex", "d:3", None, d3),
        ("put", "globex", "d:30", d30, None),
    ]
    assert changes(rows[:9]) == expected
    # One statement moving two rows: for each row, a delete of its old key then a put.
    pairs = sorted([changes(rows[9:11]), changes(rows[11:13])], key=lambda p: p[0][2])
    assert pairs == [
        [
            ("delete", "globex", "d:1", None, g1),
            ("put", "acme", "d:101", {**g1, "id": 101, "tenant": "acme"}, None),
        ],
        [
            ("delete", "globex", "d:30", None, d30),
            ("put", "acme", "d:130", {**d30, "id": 130, "tenant": "acme"}, None),
        ],
    ]
    assert changes(rows[13:]) == [("put", "acme", "d:2", up2, up2)]
    by_scope = {"acme": acme, "globex": globex}
    assert all(r["trigger_id"] == by_scope[r["scope"]] for r in rows)


@pytest.mark.parametrize("write", WRITERS)
async def test_a_row_without_key_or_scope_fails_the_writers_statement(
    write: Writer, dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE items (n int, code text, tenant text)")
    await conn.execute("INSERT INTO items VALUES (0, 'c0', 'acme')")  # before the capture
    await trigger(conn, namespace="items")
    await CAPTURES.add(conn, "items", namespace="items", scope_column="tenant", keys=["code"])
    ok = "INSERT INTO items VALUES (1, 'c1', 'acme')"

    for statement, column, what in [
        ("INSERT INTO items VALUES (2, NULL, 'acme')", "code", "key"),
        ("INSERT INTO items VALUES (3, 'c3', NULL)", "tenant", "scope"),
        ("UPDATE items SET code = NULL WHERE n = 0", "code", "key"),
        ("UPDATE items SET tenant = NULL", "tenant", "scope"),
    ]:
        with pytest.raises(Refused) as refused:
            await write(dsn, [ok, statement])
        assert refused.value.sqlstate == "22023"
        assert refused.value.message == (
            f"public.items: the captured column {column} is null in a changed row; a captured "
            f"row needs its {what}"
        )
        assert refused.value.hint is not None
        assert "dispatcher capture add" in refused.value.hint
    # A key past the longest a key may be: the emit refuses it, the statement fails.
    with pytest.raises(Refused) as too_long:
        await write(dsn, [ok, f"INSERT INTO items VALUES (4, '{'k' * 1024}', 'acme')"])
    assert too_long.value.sqlstate == "22023"
    assert "key must be 1 to 1024 characters" in too_long.value.message

    # Nothing written: not the rows, not the other row of the transaction, no outbox row.
    assert await outbox(conn) == []
    assert [tuple(r) for r in await conn.fetch("SELECT * FROM items")] == [(0, "c0", "acme")]
    await write(dsn, [ok])
    assert changes(await outbox(conn)) == [
        ("put", "acme", "items/c1", {"n": 1, "code": "c1", "tenant": "acme"}, None)
    ]


async def test_more_matching_triggers_than_the_fanout_cap_fail_the_statement(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """A change is never dropped in silence: when its key matches more triggers than the
    fan-out cap of the emit (100), the writer's statement fails."""
    await conn.execute("CREATE TABLE wide (id int PRIMARY KEY)")
    for i in range(101):
        await trigger(conn, namespace="wide", name=f"t{i}")
    await CAPTURES.add(conn, "wide", namespace="wide", scope="acme")
    with pytest.raises(Refused) as refused:
        await by_asyncpg(dsn, ["INSERT INTO wide VALUES (1)"])
    assert refused.value.sqlstate == "54000"
    assert "public.wide" in refused.value.message
    assert "wide/1" in refused.value.message
    assert "matches more than 100 triggers" in refused.value.message
    assert "at most 100 are allowed" in refused.value.message
    assert await count(conn, "wide") == 0
    assert await outbox(conn) == []

    await conn.execute("DELETE FROM dispatcher.triggers WHERE name = 't100'")
    await by_asyncpg(dsn, ["INSERT INTO wide VALUES (1)"])
    assert len(await outbox(conn)) == 100


async def test_a_full_backlog_fails_the_writers_statement(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """A scope at its backlog cap refuses a captured change as it refuses an emit."""
    await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY)")
    await trigger(conn)
    await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
    await FlowControl().set_backlog_cap(conn, "acme", 1, recount_interval=1e-6)
    await by_asyncpg(dsn, ["INSERT INTO accounts VALUES (1)"])
    with pytest.raises(Refused) as full:
        await by_asyncpg(dsn, ["INSERT INTO accounts VALUES (2)"])
    assert full.value.sqlstate == BACKLOG_FULL_SQLSTATE
    assert [r["id"] for r in await conn.fetch("SELECT id FROM accounts")] == [1]
    assert len(await outbox(conn)) == 1


async def test_a_renamed_key_column_fails_writes_until_added_again(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """The capture names its columns: after a rename, every write fails (the column reads
    as null) rather than going unannounced, until the capture is added again."""
    await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, tenant text)")
    await trigger(conn)
    await CAPTURES.add(conn, "accounts", namespace="accounts", scope_column="tenant")
    await conn.execute("ALTER TABLE accounts RENAME COLUMN tenant TO org")
    with pytest.raises(Refused, match="the captured column tenant is null"):
        await by_asyncpg(dsn, ["INSERT INTO accounts VALUES (1, 'acme')"])
    _, outcome = await CAPTURES.add(conn, "accounts", namespace="accounts", scope_column="org")
    assert outcome == "updated"
    await by_asyncpg(dsn, ["INSERT INTO accounts VALUES (1, 'acme')"])
    assert changes(await outbox(conn)) == [
        ("put", "acme", "accounts/1", {"id": 1, "org": "acme"}, None)
    ]


@pytest.mark.parametrize("write", WRITERS)
async def test_hostile_identifiers(write: Writer, dsn: str, conn: asyncpg.Connection) -> None:
    await conn.execute('CREATE SCHEMA "We ""ird"" s"')
    await conn.execute(
        """CREATE TABLE "We ""ird"" s"."Odd ""Name"" t" ("key col" text, "it's \\ 2" int,
            "sc""ope" text, "x" jsonb, PRIMARY KEY ("key col", "it's \\ 2"))"""
    )
    table = '"We ""ird"" s"."Odd ""Name"" t"'
    await trigger(conn, namespace="odd")
    capture, outcome = await CAPTURES.add(conn, table, namespace="odd", scope_column='sc"ope')
    assert outcome == "added"
    assert (capture.table_schema, capture.table_name) == ('We "ird" s', 'Odd "Name" t')
    assert capture.table == table
    assert capture.keys == ("key col", "it's \\ 2")
    assert capture.key_prefix == 'Odd "Name" t/'
    assert await CAPTURES.list(conn) == [capture]
    assert await CAPTURES.get(conn, table) == capture
    assert (await CAPTURES.add(conn, table, namespace="odd", scope_column='sc"ope'))[1] == (
        "unchanged"
    )

    await write(
        dsn,
        [f"""INSERT INTO {table} VALUES ('k 1', 2, 'acme', '{{"a": "''; DROP"}}')"""],
    )
    with pytest.raises(Refused) as refused:
        await write(dsn, [f"INSERT INTO {table} VALUES ('k 2', 3, NULL, NULL)"])
    assert refused.value.message.startswith(
        '"We ""ird"" s"."Odd ""Name"" t": the captured column "sc""ope" is null'
    )
    row = {"key col": "k 1", "it's \\ 2": 2, 'sc"ope': "acme", "x": {"a": "'; DROP"}}
    assert changes(await outbox(conn)) == [("put", "acme", 'Odd "Name" t/k 1/2', row, None)]

    assert await CAPTURES.remove(conn, table) == capture
    assert await capture_triggers(conn) == []
    await write(dsn, [f"DELETE FROM {table}"])
    assert len(await outbox(conn)) == 1


async def test_a_table_named_by_a_keyword_is_written_back_quoted(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute('CREATE TABLE "order" (id int PRIMARY KEY)')
    await trigger(conn, namespace="order")
    capture, _ = await CAPTURES.add(conn, '"order"', namespace="order", scope="acme")
    assert capture.table == 'public."order"'  # "public.order" would not parse as a name
    assert await CAPTURES.list(conn) == [capture]
    assert (await CAPTURES.remove(conn, capture.table)).table == capture.table


async def test_a_partitioned_table_is_captured_through_its_parent(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "CREATE TABLE events (tenant text, id int, body text, PRIMARY KEY (tenant, id))"
        " PARTITION BY LIST (tenant)"
    )
    await conn.execute("CREATE TABLE events_acme PARTITION OF events FOR VALUES IN ('acme')")
    await conn.execute("CREATE TABLE events_globex PARTITION OF events FOR VALUES IN ('globex')")
    for scope in ("acme", "globex", "initech"):
        await trigger(conn, namespace="events", scope=scope)
    capture, _ = await CAPTURES.add(
        conn, "events", namespace="events", scope_column="tenant", keys=["id"]
    )
    # A partition made after the capture is captured too.
    await conn.execute("CREATE TABLE events_initech PARTITION OF events FOR VALUES IN ('initech')")
    assert await CAPTURES.list(conn) == [capture]
    assert [t[0] for t in await capture_triggers(conn)] == [
        "events",
        "events_acme",
        "events_globex",
        "events_initech",
    ]

    await by_asyncpg(
        dsn,
        [
            "INSERT INTO events VALUES ('acme', 1, 'a')",
            "INSERT INTO events_globex VALUES ('globex', 2, 'b')",  # into the partition
            "INSERT INTO events VALUES ('initech', 3, 'c')",
        ],
    )
    # A row moving to another partition: Postgres deletes it from one and inserts it into
    # the other, and so does the capture (here the scope changes as well).
    await by_asyncpg(dsn, ["UPDATE events SET tenant = 'globex' WHERE id = 1"])
    await by_asyncpg(dsn, ["UPDATE events_globex SET body = 'B' WHERE id = 2"])
    a1, b2 = {"tenant": "acme", "id": 1, "body": "a"}, {"tenant": "globex", "id": 2, "body": "b"}
    assert changes(await outbox(conn)) == [
        ("put", "acme", "events/1", a1, None),
        ("put", "globex", "events/2", b2, None),
        ("put", "initech", "events/3", {"tenant": "initech", "id": 3, "body": "c"}, None),
        ("delete", "acme", "events/1", None, a1),
        ("put", "globex", "events/1", {**a1, "tenant": "globex"}, None),
        ("put", "globex", "events/2", {**b2, "body": "B"}, b2),
    ]

    # A partition of a captured table cannot be captured again on its own, nor a
    # partitioned table one of whose partitions is.
    with pytest.raises(InvalidInput, match=r"partition of public\.events, which is captured"):
        await CAPTURES.add(conn, "events_acme", namespace="other", scope="acme")
    with pytest.raises(CaptureNotFound):
        await CAPTURES.remove(conn, "events_acme")
    assert await CAPTURES.list(conn) == [capture]
    assert len(await capture_triggers(conn)) == 4

    # Removing the parent's capture removes the partitions' clones.
    await CAPTURES.remove(conn, "events")
    assert await capture_triggers(conn) == []
    await by_asyncpg(dsn, ["DELETE FROM events"])
    assert len(await outbox(conn)) == 6

    await CAPTURES.add(conn, "events_acme", namespace="events", scope="acme", keys=["id"])
    with pytest.raises(InvalidInput, match=r"partition public\.events_acme is captured"):
        await CAPTURES.add(conn, "events", namespace="events", scope_column="tenant")
    assert [t[0] for t in await capture_triggers(conn)] == ["events_acme"]


async def test_adding_again_is_idempotent(dsn: str, conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, tenant text NOT NULL)")
    await trigger(conn)
    await trigger(conn, namespace="ledger")

    first, outcome = await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
    assert outcome == "added"
    before = await capture_triggers(conn)
    # The same settings, spelt out or not: nothing changes, not even the trigger's oid.
    oid = await conn.fetchval(f"SELECT oid FROM pg_trigger WHERE tgfoid = {CAPTURE_ROW}")
    for kw in (
        {},
        {"keys": ["id"]},
        {"key_prefix": "accounts/"},
        {"keys": ("id",), "key_prefix": "accounts/"},
    ):
        again = await CAPTURES.add(
            conn, "public.accounts", namespace="accounts", scope="acme", **kw
        )
        assert again == (first, "unchanged")
    assert await capture_triggers(conn) == before
    assert await conn.fetchval(f"SELECT oid FROM pg_trigger WHERE tgfoid = {CAPTURE_ROW}") == oid

    for kw, changed in [
        ({"namespace": "ledger", "scope": "acme"}, {"namespace": "ledger"}),
        (
            {"namespace": "ledger", "scope_column": "tenant"},
            {"namespace": "ledger", "scope": None, "scope_column": "tenant"},
        ),
        (
            {"namespace": "ledger", "scope_column": "tenant", "key_prefix": ""},
            {"namespace": "ledger", "scope": None, "scope_column": "tenant", "key_prefix": ""},
        ),
    ]:
        updated, outcome = await CAPTURES.add(conn, "accounts", **kw)
        assert outcome == "updated"
        assert updated == Capture(
            **{**_fields(first), **changed}  # type: ignore[arg-type]
        )
        assert len(await capture_triggers(conn)) == 1
        assert await CAPTURES.list(conn) == [updated]

    # A capture disabled by hand (ALTER TABLE ... DISABLE TRIGGER) is listed so, and adding
    # it again with its settings enables it.
    await conn.execute(f'ALTER TABLE accounts DISABLE TRIGGER "{updated.trigger}"')
    [disabled] = await CAPTURES.list(conn)
    assert not disabled.enabled
    assert await CAPTURES.add(conn, "accounts", **kw) == (updated, "updated")
    assert await CAPTURES.list(conn) == [updated]
    assert len(await capture_triggers(conn)) == 1

    await by_asyncpg(dsn, ["INSERT INTO accounts VALUES (1, 'acme')"])
    assert changes(await outbox(conn)) == [("put", "acme", "1", {"id": 1, "tenant": "acme"}, None)]
    assert [r["trigger_name"] for r in await outbox(conn)] == ["ledger-all"]


def _fields(c: Capture) -> dict[str, Any]:
    return {f: getattr(c, f) for f in c.__dataclass_fields__}


# --- what add refuses, changing nothing ---

REFUSALS: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing", {}, "table", "no such table"),
    ("public.missing", {}, "table", "no such table"),
    ("accounts_v", {}, "table", "is not a table"),
    ("accounts_m", {}, "table", "is not a table"),
    ("a_sequence", {}, "table", "is not a table"),
    ("a.b.c.d", {}, "table", "is not a valid table name"),
    ("otherdb.public.accounts", {}, "table", "is not a valid table name"),
    ('"unterminated', {}, "table", "is not a valid table name"),
    ("", {}, "table", "must be a table name"),
    ("dispatcher.outbox", {}, "table", "is one of dispatcher's own tables"),
    ("dispatcher.kv", {"keys": ["key"]}, "table", "is one of dispatcher's own tables"),
    ("pg_catalog.pg_class", {"keys": ["relname"]}, "table", "is a system table"),
    ("information_schema.sql_features", {"keys": ["feature_id"]}, "table", "is a system table"),
    ("nopk", {}, "keys", "the table has no primary key: name the key columns"),
    ("accounts", {"keys": ["nope"]}, "keys", "table accounts has no such column (it has: id,"),
    ("accounts", {"keys": ["doc"]}, "keys", "is of type jsonb"),
    ("accounts", {"keys": ["ratio"]}, "keys", "is of type double precision"),
    ("accounts", {"keys": ["id", "seen"]}, "keys", "is of type timestamp with time zone"),
    ("accounts", {"keys": []}, "keys", "must be a non-empty list"),
    ("accounts", {"keys": "id"}, "keys", "must be a non-empty list"),
    ("accounts", {"keys": ["id", "id"]}, "keys", "names a column twice"),
    ("accounts", {"scope": "acme", "scope_column": "tenant"}, "scope", "exactly one"),
    ("accounts", {"scope": None}, "scope", "exactly one"),
    ("accounts", {"scope": None, "scope_column": "nope"}, "scope_column", "no such column"),
    ("accounts", {"scope": None, "scope_column": "doc"}, "scope_column", "is of type jsonb"),
    ("accounts", {"scope": ""}, "scope", "must not be empty"),
    ("accounts", {"namespace": ""}, "namespace", "must not be empty"),
    ("accounts", {"namespace": "x\x01"}, "namespace", "control characters"),
    ("accounts", {"key_prefix": "a\nb"}, "key_prefix", "control characters"),
    ("accounts", {"key_prefix": "k" * 1025}, "key_prefix", "at most 1024"),
]


async def test_two_adds_at_once_leave_one_trigger(dsn: str, conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY)")
    await trigger(conn)
    other = await asyncpg.connect(dsn)
    try:
        # The first add's transaction stays open (its trigger uncommitted) while the second
        # starts: the second waits for the table's lock, then finds the first's trigger.
        tx = conn.transaction()
        await tx.start()
        await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
        async with anyio.create_task_group() as tg:
            outcomes: list[str] = []

            async def second() -> None:
                outcomes.append(
                    (await CAPTURES.add(other, "accounts", namespace="accounts", scope="acme"))[1]
                )

            tg.start_soon(second)
            with anyio.fail_after(10):
                # Each query yields to the second add; the loop ends on the lock, not on time.
                waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1"
                accounts = await conn.fetchval("SELECT 'accounts'::regclass::oid")
                while not await conn.fetchval(waiting, accounts):
                    pass
            await tx.commit()
        assert outcomes == ["unchanged"]
        assert len(await capture_triggers(conn)) == 1
    finally:
        await other.close()


@pytest.mark.parametrize(
    ("table", "kw", "field", "reason"), REFUSALS, ids=[f"{t}-{f}" for t, _, f, _ in REFUSALS]
)
async def test_what_add_refuses_changes_nothing(
    conn: asyncpg.Connection, table: str, kw: dict[str, Any], field: str, reason: str
) -> None:
    await conn.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, tenant text, doc jsonb, ratio float8,"
        " seen timestamptz, code varchar(10))"
    )
    await conn.execute("CREATE TABLE nopk (a int, b text)")
    await conn.execute("CREATE VIEW accounts_v AS SELECT * FROM accounts")
    await conn.execute("CREATE MATERIALIZED VIEW accounts_m AS SELECT * FROM accounts")
    await conn.execute("CREATE SEQUENCE a_sequence")
    # Already captured: a refused add leaves that capture as it was.
    existing, _ = await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
    before = await capture_triggers(conn)

    args: dict[str, Any] = {"namespace": "other", "scope": "globex", **kw}
    with pytest.raises(InvalidInput) as refused:
        await CAPTURES.add(conn, table, **args)
    assert refused.value.field == field
    assert reason in str(refused.value)
    assert await capture_triggers(conn) == before
    assert await CAPTURES.list(conn) == [existing]


async def test_key_types(conn: asyncpg.Connection) -> None:
    """Each key type takes, and its text is the key's; a domain is read as its base type."""
    assert {"text", "int4", "int8", "numeric", "uuid", "varchar", "bpchar"} <= KEY_TYPES
    await conn.execute("CREATE DOMAIN code AS varchar(8) CHECK (VALUE <> '')")
    await conn.execute(
        "CREATE TABLE typed (a int2, b int8, c numeric, d uuid, e char(3), f code, g varchar,"
        " PRIMARY KEY (a, b, c, d, e, f, g))"
    )
    await trigger(conn, namespace="typed")
    await CAPTURES.add(conn, "typed", namespace="typed", scope="acme", key_prefix="")
    u = uuid.UUID(int=7)
    await conn.execute(
        "INSERT INTO typed VALUES (-1, 9007199254740993, 1.50, $1, 'x', 'c/d', 'ü')", u
    )
    [row] = await outbox(conn)
    assert row["payload"]["key"] == f"-1/9007199254740993/1.50/{u}/x  /c/d/ü"


async def test_schemas_not_migrated_to_capture(empty_dsn: str, conn: asyncpg.Connection) -> None:
    await migrate(empty_dsn, revision="0010")
    old = await asyncpg.connect(empty_dsn)
    try:
        await old.execute("CREATE TABLE accounts (id int PRIMARY KEY)")
        for call in (
            CAPTURES.add(old, "accounts", namespace="accounts", scope="acme"),
            CAPTURES.list(old),
            CAPTURES.get(old, "accounts"),
            CAPTURES.remove(old, "accounts"),
        ):
            with pytest.raises(InvalidInput, match=r"run `dispatcher migrate` \(revision 0011"):
                await call
        assert await old.fetchval("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0
    finally:
        await old.close()
    # A schema that was never migrated.
    with pytest.raises(InvalidInput, match="has no capture function"):
        await Captures("elsewhere").list(conn)
    with pytest.raises(InvalidInput, match="lower-case Postgres identifier"):
        await Captures("Bad Name").list(conn)


async def test_two_schemas_capture_one_table_each_to_its_own_outbox(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """A second dispatcher schema, its name too long for ``<schema>_capture`` to fit in a
    Postgres name (the trigger's name is cut and told apart by a digest): both capture one
    table, each into its own outbox."""
    # 58: the longest a schema's name can be and emit still work (its wake-up channel,
    # "<schema>_wake", must fit in 63 bytes).
    other = "s" * 58
    await migrate(dsn, schema=other)
    await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY)")
    await trigger(conn)
    await trigger(conn, schema=other)
    mine, _ = await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
    theirs, outcome = await Captures(other).add(
        conn, "accounts", namespace="accounts", scope="acme"
    )
    assert outcome == "added"
    assert len(theirs.trigger) == 63
    assert theirs.trigger.startswith("s" * 46 + "_capture_")
    assert await Captures(other).add(conn, "accounts", namespace="accounts", scope="acme") == (
        theirs,
        "unchanged",
    )
    assert await Captures(other).list(conn) == [theirs]
    assert await CAPTURES.list(conn) == [mine]
    names = await conn.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'accounts'::regclass ORDER BY 1"
    )
    assert sorted([mine.trigger, theirs.trigger]) == [r["tgname"] for r in names]

    await by_asyncpg(dsn, ["INSERT INTO accounts VALUES (1)"])
    assert len(await outbox(conn)) == 1
    assert len(await outbox(conn, f'"{other}"')) == 1
    await Captures(other).remove(conn, "accounts")
    assert await CAPTURES.list(conn) == [mine]


# --- remove ---


async def test_remove(dsn: str, conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY)")
    await conn.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
    await trigger(conn)
    await trigger(conn, namespace="ledger")
    added, _ = await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
    kept, _ = await CAPTURES.add(conn, "ledger", namespace="ledger", scope="acme")
    assert await CAPTURES.list(conn) == [added, kept]
    await by_asyncpg(dsn, ["INSERT INTO accounts VALUES (1)"])

    assert await CAPTURES.remove(conn, "accounts") == added
    assert await CAPTURES.get(conn, "accounts") is None
    assert await CAPTURES.list(conn) == [kept]
    await by_asyncpg(
        dsn,
        [
            "INSERT INTO accounts VALUES (2)",
            "UPDATE accounts SET id = 3 WHERE id = 2",
            "DELETE FROM accounts",
        ],
    )
    await by_asyncpg(dsn, ["INSERT INTO ledger VALUES (1)"])
    assert [c[2] for c in changes(await outbox(conn))] == ["accounts/1", "ledger/1"]
    # Rows already enqueued stay.
    with pytest.raises(CaptureNotFound) as again:
        await CAPTURES.remove(conn, "accounts")
    assert str(again.value) == "invalid table='accounts': is not captured"
    with pytest.raises(InvalidInput, match="no such table"):
        await CAPTURES.remove(conn, "missing")
    assert await CAPTURES.list(conn) == [kept]
    assert await count(conn, "accounts") == 0  # the table itself is untouched


# --- migrations ---


async def test_the_capture_outlives_migrate_and_a_downgrade_drops_it(empty_dsn: str) -> None:
    head = await migrate(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, name text)")
        await conn.execute(
            "CREATE TABLE events (tenant text, id int, PRIMARY KEY (tenant, id))"
            " PARTITION BY LIST (tenant)"
        )
        await conn.execute("CREATE TABLE events_acme PARTITION OF events FOR VALUES IN ('acme')")
        await conn.execute("CREATE TABLE own (id int)")
        await conn.execute(
            "CREATE FUNCTION own_trigger() RETURNS trigger LANGUAGE plpgsql"
            " AS 'BEGIN RETURN NULL; END'"
        )
        await conn.execute(
            "CREATE TRIGGER own AFTER INSERT ON own FOR EACH ROW EXECUTE FUNCTION own_trigger()"
        )
        await trigger(conn)
        await trigger(conn, namespace="events")
        captured = [
            (await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme"))[0],
            (await CAPTURES.add(conn, "events", namespace="events", scope="acme"))[0],
        ]
        await by_asyncpg(empty_dsn, ["INSERT INTO accounts VALUES (1, 'a')"])

        # Run again (a no-op), and up to the revision it is at: the captures stay.
        assert await migrate(empty_dsn) == head
        assert await migrate(empty_dsn, revision="0011") == head
        assert await CAPTURES.list(conn) == captured
        await by_asyncpg(
            empty_dsn,
            ["INSERT INTO accounts VALUES (2, 'b')", "INSERT INTO events VALUES ('acme', 1)"],
        )
        assert [c[2] for c in changes(await outbox(conn))] == [
            "accounts/1",
            "accounts/2",
            "events/acme/1",
        ]

        await downgrade(empty_dsn, "0010")
        assert await conn.fetchval("SELECT to_regprocedure('dispatcher.capture_row()')") is None
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture%'") == 0
        )
        triggers = await conn.fetch(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal"
        )
        assert [tuple(t) for t in triggers] == [("own", "own")]
        # The host's tables and their rows stay; writing them emits nothing any more.
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM accounts ORDER BY id")] == [
            (1, "a"),
            (2, "b"),
        ]
        assert await count(conn, "events") == 1
        await by_asyncpg(
            empty_dsn,
            [
                "UPDATE accounts SET name = 'c'",
                "INSERT INTO events VALUES ('acme', 2)",
                "DELETE FROM accounts WHERE id = 1",
            ],
        )
        assert len(await outbox(conn)) == 3
        with pytest.raises(InvalidInput, match="revision 0011"):
            await CAPTURES.list(conn)

        # Up again: the captures are not restored, and can be added anew.
        assert await migrate(empty_dsn) == head
        assert await CAPTURES.list(conn) == []
        await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
        await by_asyncpg(empty_dsn, ["DELETE FROM accounts"])
        assert changes(await outbox(conn))[3:] == [
            ("delete", "acme", "accounts/2", None, {"id": 2, "name": "c"})
        ]
    finally:
        await conn.close()


# --- privileges ---


def as_role(dsn: str, role: str) -> str:
    """The same URL with another user (the test server trusts local connections)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


async def test_least_privilege(dsn: str, conn: asyncpg.Connection) -> None:
    """A writer with privileges on the captured table only (none on the library's schema)
    writes it and its rows are enqueued. A table's owner attaches a capture once it may use
    the library's schema and execute capture_row, and only to a table it owns."""
    suffix = uuid.uuid4().hex[:8]
    writer, owner = f"capture_writer_{suffix}", f"capture_owner_{suffix}"
    try:
        await conn.execute(f"CREATE ROLE {writer} LOGIN")
    except asyncpg.InsufficientPrivilegeError as exc:
        pytest.skip(f"the test database's user cannot create roles: {exc}")
    try:
        await conn.execute(f"CREATE ROLE {owner} LOGIN")
        await conn.execute("CREATE SCHEMA app")
        await conn.execute("CREATE TABLE app.accounts (id int PRIMARY KEY, name text)")
        await conn.execute("CREATE TABLE app.owned (id int PRIMARY KEY)")
        await conn.execute(f"ALTER TABLE app.owned OWNER TO {owner}")
        await conn.execute(f"GRANT USAGE ON SCHEMA app TO {writer}, {owner}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON app.accounts TO {writer}")
        await trigger(conn)
        await trigger(conn, namespace="owned")
        await CAPTURES.add(conn, "app.accounts", namespace="accounts", scope="acme")

        as_writer = as_role(dsn, writer)
        await by_asyncpg(as_writer, ["INSERT INTO app.accounts VALUES (1, 'a')"])
        await by_psycopg(as_writer, ["UPDATE app.accounts SET name = 'b'"])
        await by_asyncpg(as_writer, ["DELETE FROM app.accounts"])
        assert [c[0] for c in changes(await outbox(conn))] == ["put", "put", "delete"]
        # It has no grant on the library's schema: it can neither emit nor read the outbox
        # itself, nor attach a capture.
        for forbidden in (
            "SELECT * FROM dispatcher.outbox",
            "SELECT dispatcher.emit(gen_random_uuid(), 'acme', 'accounts', 'k', 'put', '1')",
        ):
            with pytest.raises(Refused) as denied:
                await by_asyncpg(as_writer, [forbidden])
            assert denied.value.sqlstate == "42501"

        # The owner of app.owned: USAGE on the schema and EXECUTE on capture_row needed.
        owner_conn = await asyncpg.connect(as_role(dsn, owner))
        try:
            for grant in (
                f"GRANT USAGE ON SCHEMA dispatcher TO {owner}",
                f"GRANT EXECUTE ON FUNCTION dispatcher.capture_row() TO {owner}",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await CAPTURES.add(owner_conn, "app.owned", namespace="owned", scope="acme")
                assert len(await capture_triggers(conn)) == 1
                await conn.execute(grant)
            await CAPTURES.add(owner_conn, "app.owned", namespace="owned", scope="acme")
            # Not on a table it does not own.
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="must be owner"):
                await CAPTURES.remove(owner_conn, "app.accounts")
            # add takes the table's lock first: refused there, before CREATE TRIGGER would be.
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await CAPTURES.add(owner_conn, "app.accounts", namespace="x", scope="acme")
            assert len(await CAPTURES.list(owner_conn)) == 2
            await owner_conn.execute("INSERT INTO app.owned VALUES (1)")
        finally:
            await owner_conn.close()
        assert changes(await outbox(conn))[3:] == [("put", "acme", "owned/1", {"id": 1}, None)]
    finally:
        for role in (writer, owner):
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")


# --- end to end ---


async def test_a_dispatcher_hands_the_rows_to_the_handler(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    seen: list[dict[str, Any]] = []

    @handlers.handler("sync")
    async def sync(ctx: HandlerContext) -> None:
        seen.append(dict(ctx.event))

    await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, plan text)")
    await trigger(conn, retry=RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=1))
    await CAPTURES.add(conn, "accounts", namespace="accounts", scope="acme")
    await by_asyncpg(dsn, ["INSERT INTO accounts VALUES (1, 'free')"])
    await by_psycopg(dsn, ["UPDATE accounts SET plan = 'pro'"])
    await by_asyncpg(dsn, ["DELETE FROM accounts"])

    config = DispatcherConfig(poll_interval=0.05, grace_period=5, breaker_threshold=0)
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle(time_limit=60)
    assert stats.succeeded == 3
    assert await outbox(conn) == []
    free, pro = {"id": 1, "plan": "free"}, {"id": 1, "plan": "pro"}
    assert sorted(
        ((e["op"], e["key"], e["value"], e["old"]) for e in seen), key=lambda e: str(e[2:])
    ) == sorted(
        [
            ("put", "accounts/1", free, None),
            ("put", "accounts/1", pro, free),
            ("delete", "accounts/1", None, pro),
        ],
        key=lambda e: str(e[2:]),
    )
    assert {(e["scope"], e["namespace"]) for e in seen} == {("acme", "accounts")}


# --- property: whatever a row holds, value and old are the row ---

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**70, -(2**80)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.text(
                st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=8
            ),
            inner,
            max_size=3,
        )
    ),
    max_leaves=10,
)
NOTE = st.none() | st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=30
)
WRITES = st.lists(
    st.tuples(
        st.sampled_from(["insert", "update", "delete"]),
        st.integers(0, 2),
        JSON,
        NOTE,
        st.booleans(),  # commit (or roll back)
    ),
    min_size=1,
    max_size=8,
)


def numbers(text: str) -> Any:
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(writes=WRITES)
async def test_value_and_old_are_the_rows_as_written(
    dsn: str, conn: asyncpg.Connection, writes: list[tuple[str, int, Any, str | None, bool]]
) -> None:
    """Whatever JSON and text a row holds, each committed write's value and old are the row
    after and before it as to_jsonb gives them, and what to_jsonb gives is what was written;
    rolled-back writes and statements that change no row leave nothing."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS notes (id int PRIMARY KEY, body jsonb, note text)"
    )
    await conn.execute("TRUNCATE notes, dispatcher.outbox")  # TRUNCATE is not captured
    if not await CAPTURES.list(conn):
        await trigger(conn, namespace="notes")
        await CAPTURES.add(conn, "notes", namespace="notes", scope="acme")

    statements = {
        "insert": ("INSERT INTO notes VALUES ($1, $2::jsonb, $3) ON CONFLICT DO NOTHING", 3),
        "update": ("UPDATE notes SET body = $2::jsonb, note = $3 WHERE id = $1", 3),
        "delete": ("DELETE FROM notes WHERE id = $1", 1),
    }
    read = "SELECT to_jsonb(n) FROM notes n WHERE id = $1"
    expected: list[tuple[Any, ...]] = []
    writer = await asyncpg.connect(dsn)
    try:
        for op, id_, body, note, commit in writes:
            tx = writer.transaction()
            await tx.start()
            before = await writer.fetchval(read, id_)
            sql, n = statements[op]
            await writer.execute(sql, *(id_, json.dumps(body), note)[:n])
            after = await writer.fetchval(read, id_)
            await (tx.commit() if commit else tx.rollback())
            old = None if before is None else json.loads(before)
            new = None if after is None else json.loads(after)
            wrote = (old is None) == (op == "insert")  # else no row was changed
            if wrote and op != "delete":
                # to_jsonb of the row is what was written (numbers compared as numbers: jsonb
                # keeps 3.6e+16 as 36000000000000000).
                assert numbers(after) == numbers(
                    json.dumps({"id": id_, "body": body, "note": note})
                )
            if not (commit and wrote):
                continue
            key = f"notes/{id_}"
            expected.append(
                ("delete", "acme", key, None, old)
                if op == "delete"
                else ("put", "acme", key, new, old)
            )
    finally:
        await writer.close()
    assert changes(await outbox(conn)) == expected
