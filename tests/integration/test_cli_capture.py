"""``dispatcher capture add|list|remove`` against real Postgres: what each prints, JSON, and
bad input reported in one line (exit status 1) or as a usage error (2), changing nothing."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from cli_run import assert_error, ok, ok_json, run
from test_capture import as_role

from dispatcher import Captures, migrate

pytestmark = pytest.mark.anyio


async def tables(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "CREATE TABLE accounts (region text, id int, tenant text, doc jsonb,"
        " PRIMARY KEY (region, id))"
    )
    await conn.execute('CREATE TABLE "Odd ""Name"" t" ("key col" text PRIMARY KEY)')
    await conn.execute("CREATE VIEW accounts_v AS SELECT * FROM accounts")


async def capture_triggers(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_trigger"
            " WHERE tgfoid = 'dispatcher.capture_row()'::regprocedure"
        )
    )


async def test_add_list_remove(dsn: str, conn: asyncpg.Connection) -> None:
    await tables(conn)
    assert (await ok("capture", "list", "--dsn", dsn)).stdout == "no captured tables\n"
    assert await ok_json("capture", "list", "--dsn", dsn) == []

    add = ("capture", "add", "accounts", "--namespace", "accounts", "--dsn", dsn)
    added = await ok(*add, "--scope", "acme")
    assert added.stdout == (
        "capture of public.accounts added: namespace accounts, scope acme, "
        "keys accounts/<region>/<id>\n"
    )
    again = await ok(*add, "--scope", "acme", "--key", "region", "--key", "id")
    assert again.stdout == added.stdout.replace(" added:", " unchanged:")
    updated = await ok(*add, "--scope-column", "tenant", "--key", "id", "--key-prefix", "acc:")
    assert updated.stdout == (
        "capture of public.accounts updated: namespace accounts, scope column tenant, "
        "keys acc:<id>\n"
    )
    odd = await ok(
        "capture", "add", '"Odd ""Name"" t"', "--namespace", "odd", "--scope", "acme", "--dsn", dsn
    )
    assert odd.stdout == (
        'capture of public."Odd ""Name"" t" added: namespace odd, scope acme, '
        'keys Odd "Name" t/<key col>\n'
    )
    assert await capture_triggers(conn) == 2

    listed = (await ok("capture", "list", "--dsn", dsn)).stdout.splitlines()
    assert listed[0].split() == ["table", "namespace", "scope", "key", "trigger", "enabled"]
    assert listed[2].split() == [
        'public."Odd',
        '""Name""',
        't"',
        "odd",
        "acme",
        "Odd",
        '"Name"',
        "t/<key",
        "col>",
        "dispatcher_capture",
        "yes",
    ]
    assert listed[3].split() == [
        "public.accounts",
        "accounts",
        "column",
        "tenant",
        "acc:<id>",
        "dispatcher_capture",
        "yes",
    ]
    assert listed[-1] == "2 captured table(s)"
    assert await ok_json("capture", "list", "--dsn", dsn) == [
        {
            "table": 'public."Odd ""Name"" t"',
            "table_schema": "public",
            "table_name": 'Odd "Name" t',
            "namespace": "odd",
            "keys": ["key col"],
            "key_prefix": 'Odd "Name" t/',
            "scope": "acme",
            "scope_column": None,
            "trigger": "dispatcher_capture",
            "enabled": True,
        },
        {
            "table": "public.accounts",
            "table_schema": "public",
            "table_name": "accounts",
            "namespace": "accounts",
            "keys": ["id"],
            "key_prefix": "acc:",
            "scope": None,
            "scope_column": "tenant",
            "trigger": "dispatcher_capture",
            "enabled": True,
        },
    ]

    removed = await ok("capture", "remove", "public.accounts", "--dsn", dsn)
    assert removed.stdout == "capture of public.accounts removed\n"
    assert_error(
        await run("capture", "remove", "accounts", "--dsn", dsn),
        contains="invalid table='accounts': is not captured",
    )
    assert [c.table_name for c in await Captures().list(conn)] == ['Odd "Name" t']


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "give exactly one of --scope and --scope-column"),
        (["--scope", "acme", "--scope-column", "tenant"], 2, "give exactly one of --scope"),
        (["--scope", "acme", "--namespace", ""], 1, "invalid namespace='': must not be empty"),
        (["--scope", "acme", "--key", "doc"], 1, "invalid keys='doc': is of type jsonb"),
        (["--scope", "acme", "--key", "nope"], 1, "table accounts has no such column"),
        (["--scope-column", "nope"], 1, "invalid scope_column='nope'"),
        (["--scope", "acme", "--schema", "elsewhere"], 1, "has no capture function"),
        (["--scope", "acme", "--schema", "Bad-Name"], 1, "invalid schema='Bad-Name'"),
    ],
)
async def test_add_refusals(
    dsn: str, conn: asyncpg.Connection, args: list[str], code: int, message: str
) -> None:
    await tables(conn)
    result = await run("capture", "add", "accounts", "--namespace", "accounts", *args, "--dsn", dsn)
    assert_error(result, code=code, contains=message)
    assert await capture_triggers(conn) == 0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("missing", "invalid table='missing': no such table (or not on the search_path)"),
        ("accounts_v", "invalid table='accounts_v': is not a table"),
        ("dispatcher.outbox", "is one of dispatcher's own tables"),
        ("a.b.c.d", "is not a valid table name"),
    ],
)
async def test_tables_add_refuses(
    dsn: str, conn: asyncpg.Connection, table: str, message: str
) -> None:
    await tables(conn)
    result = await run("capture", "add", table, "--namespace", "n", "--scope", "acme", "--dsn", dsn)
    assert_error(result, contains=message)
    assert_error(await run("capture", "remove", table, "--dsn", dsn), contains=message)
    assert await capture_triggers(conn) == 0


async def test_usage_errors(dsn: str) -> None:
    assert_error(
        await run("capture", "add", "accounts", "--scope", "acme", "--dsn", dsn),
        code=2,
        contains="Missing option '--namespace'",
    )
    assert_error(
        await run("capture", "add", "--namespace", "n", "--scope", "acme", "--dsn", dsn),
        code=2,
        contains="Missing argument 'TABLE'",
    )
    assert_error(await run("capture", "remove", "--dsn", dsn), code=2, contains="TABLE")
    assert_error(await run("capture", "list"), code=2, contains="give --dsn or set DATABASE_URL")


async def test_a_schema_before_capture(empty_dsn: str) -> None:
    await migrate(empty_dsn, revision="0010")
    for args in (["list"], ["remove", "t"], ["add", "t", "--namespace", "n", "--scope", "s"]):
        assert_error(
            await run("capture", *args, "--dsn", empty_dsn),
            contains="has no capture function: run `dispatcher migrate` (revision 0011 or later)",
        )


async def test_without_the_privilege_to_attach_a_trigger(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """A Postgres refusal is one line too: here, the table's owner may not execute
    capture_row."""
    role = f"capture_cli_{uuid.uuid4().hex[:8]}"
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN")
    except asyncpg.InsufficientPrivilegeError as exc:
        pytest.skip(f"the test database's user cannot create roles: {exc}")
    try:
        await tables(conn)
        await conn.execute(f"ALTER TABLE accounts OWNER TO {role}")
        await conn.execute(f"GRANT USAGE ON SCHEMA dispatcher TO {role}")
        nobody = as_role(dsn, role)
        result = await run(
            "capture", "add", "accounts", "--namespace", "n", "--scope", "s", "--dsn", nobody
        )
        assert_error(
            result, contains="Postgres error: permission denied for function dispatcher.capture_row"
        )
    finally:
        await conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
