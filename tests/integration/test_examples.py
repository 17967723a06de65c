"""The recipes in examples/, run as their users run them, against real Postgres: each once
committing and once rolling back, after the setup docs/embedding.md gives (examples/accounts.sql
and a trigger).

- ``fastapi_sqlalchemy.py``: the app, through httpx's ASGI transport (its lifespan included);
- ``flask_psycopg.py``: the app, through Flask's ``test_client``;
- ``django_app.py``: the script, in a process of its own (Django's settings are per process);
- ``psql.sql``: the file, through the ``psql`` client (on PATH, or the one the ``pgserver``
  package ships) and, always, through psycopg, as a machine without any psql would run it.

A commit leaves the account on the new plan and one outbox row for the matching trigger, with
its policy snapshot and the mutation in its payload; a rollback (the example's own failure
after the emit, or ``ROLLBACK`` for the SQL file) leaves neither. docs/embedding.md shows the
files' essential lines: they are checked against the files here too.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import asyncpg
import psycopg
import pytest

from dispatcher import RetryPolicy, TriggerRegistry
from dispatcher.migrate import migrate
from dispatcher.sql import POLICY_COLUMNS

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
EMBEDDING = ROOT / "docs" / "embedding.md"
POLICY = ", ".join(POLICY_COLUMNS)
WELCOME = RetryPolicy(kind="linear", base_delay=2, factor=1, max_delay=60, max_attempts=7)

# Runs one example: committing, or failing after the emit (rolling back).
Runner = Callable[[str, bool, str], Awaitable[None]]


def example(name: str) -> ModuleType:
    """``examples/<name>.py``, imported as an application imports it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"examples.{name}")


def plan(commit: bool) -> str:
    # The examples' payment step declines "enterprise", after the emit.
    return "pro" if commit else "enterprise"


async def run_fastapi(dsn: str, commit: bool, schema: str) -> None:
    # httpx's ASGI transport, not FastAPI's TestClient (Starlette's, which now warns that it
    # wants httpx2). The transport sends no lifespan events: the app's lifespan, which disposes
    # of its engine, runs around the request here, as a server runs it.
    import httpx

    app = example("fastapi_sqlalchemy").create_app(dsn, schema=schema)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://recipe") as client,
    ):
        response = await client.put("/accounts/42/plan", json={"plan": plan(commit)})
    if commit:
        assert (response.status_code, response.json()) == (200, {"id": 42, "plan": "pro"})
    else:
        assert response.status_code == 402
        assert "sales team" in response.json()["detail"]


async def run_flask(dsn: str, commit: bool, schema: str) -> None:
    def call() -> tuple[int, Any]:
        app = example("flask_psycopg").create_app(dsn, schema=schema)
        response = app.test_client().put("/accounts/42/plan", json={"plan": plan(commit)})
        return response.status_code, response.get_json()

    status, body = await anyio.to_thread.run_sync(call)
    if commit:
        assert (status, body) == (200, {"id": 42, "plan": "pro"})
    else:
        assert status == 402
        assert "sales team" in body["detail"]


async def run_django(dsn: str, commit: bool, schema: str) -> None:
    env = {**os.environ, "DATABASE_URL": dsn, "DISPATCHER_SCHEMA": schema}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = await anyio.run_process(
        [sys.executable, str(EXAMPLES / "django_app.py"), "42", plan(commit)],
        cwd=ROOT,
        env=env,
        check=False,
    )
    out, err = done.stdout.decode(), done.stderr.decode()
    if commit:
        assert done.returncode == 0, err
        assert "account 42 is on pro" in out
    else:
        assert done.returncode == 1, err
        assert "declined, nothing changed" in err


def psql_client() -> str | None:
    """A psql binary: on PATH, else the one the ``pgserver`` package ships (looked up without
    importing it), else None."""
    found = shutil.which("psql")
    if found:
        return found
    spec = importlib.util.find_spec("pgserver")
    for location in (spec and spec.submodule_search_locations) or []:
        candidate = Path(location) / "pginstall" / "bin" / "psql"
        if candidate.is_file():
            return str(candidate)
    return None


def sql_file(commit: bool) -> str:
    text = (EXAMPLES / "psql.sql").read_text(encoding="utf-8")
    if commit:
        return text
    assert text.count("\nCOMMIT;\n") == 1
    return text.replace("\nCOMMIT;\n", "\nROLLBACK;\n")


async def run_psql(dsn: str, commit: bool, schema: str) -> None:
    client = psql_client()
    if client is None:
        # No psql on this machine: its statements go through psycopg, as in run_psycopg.
        await run_psycopg(dsn, commit, schema)
        return
    command = [client, dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"]
    if commit:  # as the file says to run it
        done = await anyio.run_process([*command, str(EXAMPLES / "psql.sql")], check=False)
    else:
        done = await anyio.run_process([*command, "-"], input=sql_file(False).encode(), check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert "matched" in done.stdout.decode()


async def run_psycopg(dsn: str, commit: bool, schema: str) -> None:
    """The SQL file's statements through psycopg, in one simple query: its own BEGIN and
    COMMIT (or ROLLBACK) delimit the transaction, as they do under psql."""

    def call() -> None:
        with psycopg.connect(dsn, autocommit=True) as pg:
            pg.execute(sql_file(commit))

    await anyio.to_thread.run_sync(call)


@dataclass(frozen=True)
class Example:
    name: str
    run: Runner


PYTHON_EXAMPLES = [
    Example("fastapi_sqlalchemy", run_fastapi),
    Example("flask_psycopg", run_flask),
    Example("django_app", run_django),
]
EXAMPLES_RUN = [
    *PYTHON_EXAMPLES,
    Example("psql", run_psql),
    Example("psql-through-psycopg", run_psycopg),
]


async def register_welcome(conn: asyncpg.Connection, schema: str = "dispatcher") -> int:
    trigger = await TriggerRegistry(schema=schema).register(
        conn,
        scope="acme",
        name="welcome",
        namespace="users",
        key_pattern="users/*",
        target="send_welcome",
        registered_by="user:7",
        retry=WELCOME,
    )
    return trigger.id


@pytest.fixture
async def welcome(conn: asyncpg.Connection) -> int:
    """The setup docs/embedding.md gives: the accounts table, and a trigger on users/*; the id
    of that trigger. Another trigger, on orders, must not fire."""
    await conn.execute((EXAMPLES / "accounts.sql").read_text(encoding="utf-8"))
    await TriggerRegistry().register(
        conn,
        scope="acme",
        name="orders",
        namespace="orders",
        key_pattern="*",
        target="ship",
        registered_by="user:7",
    )
    return await register_welcome(conn)


async def state(conn: asyncpg.Connection, schema: str = "dispatcher") -> tuple[str, list[Any]]:
    """The account's plan, and the outbox rows."""
    account = await conn.fetchval("SELECT plan FROM accounts WHERE id = 42")
    rows = await conn.fetch(
        "SELECT trigger_id, trigger_name, target, registered_by, depth, payload,"
        f" {POLICY} FROM {schema}.outbox ORDER BY id"
    )
    return account, [{**r, "payload": json.loads(r["payload"])} for r in rows]


async def assert_committed(
    conn: asyncpg.Connection, trigger_id: int, schema: str = "dispatcher", *, rows: int = 1
) -> None:
    account, outbox = await state(conn, schema)
    assert account == "pro"
    assert len(outbox) == rows
    snapshot = await conn.fetchrow(
        f"SELECT {POLICY} FROM {schema}.triggers WHERE id = $1", trigger_id
    )
    for row in outbox:
        assert row["trigger_id"] == trigger_id
        identity = (row["trigger_name"], row["target"], row["registered_by"], row["depth"])
        assert identity == ("welcome", "send_welcome", "user:7", 0)
        assert {c: row[c] for c in POLICY_COLUMNS} == dict(snapshot)
        assert (row["retry_kind"], row["retry_base_delay"], row["max_attempts"]) == ("linear", 2, 7)
        payload = row["payload"]
        assert payload["event_id"] == payload["root"]
        assert {k: payload[k] for k in ("scope", "namespace", "key", "op", "value")} == {
            "scope": "acme",
            "namespace": "users",
            "key": "users/42",
            "op": "put",
            "value": {"plan": "pro"},
        }


@pytest.mark.parametrize("recipe", EXAMPLES_RUN, ids=[e.name for e in EXAMPLES_RUN])
async def test_the_recipe_commits_and_rolls_back_with_the_host(
    recipe: Example, dsn: str, conn: asyncpg.Connection, welcome: int
) -> None:
    # The example fails after its emit (or the SQL file ends in ROLLBACK): nothing stays.
    await recipe.run(dsn, False, "dispatcher")
    assert await state(conn) == ("free", [])

    # As written: the plan change and the outbox row commit together.
    await recipe.run(dsn, True, "dispatcher")
    await assert_committed(conn, welcome)


async def test_the_python_recipes_emit_into_the_schema_they_are_given(
    dsn: str, conn: asyncpg.Connection, welcome: int
) -> None:
    await migrate(dsn, schema="shop_outbox")
    other = await register_welcome(conn, "shop_outbox")
    for recipe in PYTHON_EXAMPLES:
        await conn.execute("UPDATE accounts SET plan = 'free' WHERE id = 42")
        await recipe.run(dsn, True, "shop_outbox")
    await assert_committed(conn, other, "shop_outbox", rows=len(PYTHON_EXAMPLES))
    assert (await state(conn))[1] == []


# docs/embedding.md: each block marked `<!-- example: examples/NAME -->` is a run of the file's
# lines (indented as a whole, or not).
MARKED = re.compile(r"<!-- example: (examples/[\w.]+) -->\n```\w*\n(.*?)```", re.DOTALL)


def shown_excerpts() -> list[tuple[str, str]]:
    return MARKED.findall(EMBEDDING.read_text(encoding="utf-8"))


def is_excerpt(excerpt: str, source: str) -> bool:
    wanted = textwrap.dedent(excerpt).splitlines()
    lines = source.splitlines()
    return any(
        textwrap.dedent("\n".join(lines[i : i + len(wanted)])).splitlines() == wanted
        for i in range(len(lines) - len(wanted) + 1)
    )


def test_the_docs_show_every_recipe() -> None:
    shown = {path for path, _ in shown_excerpts()}
    files = {f"examples/{p.name}" for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sql")}
    assert shown == files - {"examples/compose_handlers.py"}


@pytest.mark.parametrize(("path", "excerpt"), shown_excerpts())
def test_the_docs_show_the_files_as_they_are(path: str, excerpt: str) -> None:
    assert excerpt.strip()
    assert is_excerpt(excerpt, (ROOT / path).read_text(encoding="utf-8")), path
