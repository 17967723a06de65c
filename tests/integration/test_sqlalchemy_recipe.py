"""The README's SQLAlchemy recipe, run as written there (SQLAlchemy's async engine with the
asyncpg driver): the outbox row commits and rolls back with the host's transaction.

SQLAlchemy's asyncpg driver sends ``BEGIN`` only with the first statement of a transaction,
so an emit made before it found no transaction and committed its row on its own. Such an
emit is now refused.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import dispatcher
from dispatcher import Mutation, Op, TransactionRequired

pytestmark = pytest.mark.anyio

README = Path(__file__).resolve().parents[2] / "README.md"


class HostFailed(Exception):
    """The host's own work failing after the emit, inside its transaction."""


def readme_recipe() -> str:
    """The README's one Python block that opens a SQLAlchemy transaction."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    [recipe] = [b for b in blocks if "engine.begin()" in b]
    return str(recipe)


async def run(source: str, engine: AsyncEngine) -> None:
    """Run ``source`` as the body of an async function, with the names the README's
    examples have at hand."""
    names: dict[str, object] = {
        "dispatcher": dispatcher,
        "Mutation": Mutation,
        "Op": Op,
        "engine": engine,
        "mutation": Mutation("acme", "users", "users/42", Op.PUT, {"plan": "pro"}),
        "HostFailed": HostFailed,
    }
    code = "async def recipe() -> None:\n" + textwrap.indent(source, "    ")
    exec(compile(code, "<README.md: SQLAlchemy recipe>", "exec"), names)
    await names["recipe"]()  # type: ignore[operator]


@pytest.fixture
async def engine(dsn: str, conn: asyncpg.Connection) -> AsyncIterator[AsyncEngine]:
    await conn.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, plan text NOT NULL);"
        "INSERT INTO accounts VALUES (42, 'free')"
    )
    await dispatcher.TriggerRegistry().register(
        conn,
        scope="acme",
        name="welcome",
        namespace="users",
        key_pattern="users/*",
        target="send_welcome",
        registered_by="user:7",
    )
    sa_engine = create_async_engine(make_url(dsn).set(drivername="postgresql+asyncpg"))
    try:
        yield sa_engine
    finally:
        await sa_engine.dispose()


async def state(conn: asyncpg.Connection) -> tuple[str, list[str]]:
    """The account's plan, and the keys of the outbox rows."""
    plan = await conn.fetchval("SELECT plan FROM accounts WHERE id = 42")
    rows = await conn.fetch("SELECT payload FROM dispatcher.outbox ORDER BY id")
    return plan, [json.loads(r["payload"])["key"] for r in rows]


async def test_the_readme_recipe_commits_and_rolls_back_with_the_host(
    engine: AsyncEngine, conn: asyncpg.Connection
) -> None:
    recipe = readme_recipe()
    last = recipe.rstrip().splitlines()[-1]
    assert last.startswith("    "), "the recipe ends inside its transaction"

    # The host fails after the recipe, inside the same transaction: nothing stays.
    with pytest.raises(HostFailed):
        await run(recipe + "    raise HostFailed\n", engine)
    assert await state(conn) == ("free", [])

    # As written: the update and the outbox row commit together.
    await run(recipe, engine)
    assert await state(conn) == ("pro", ["users/42"])


OLD_RECIPE = """\
async with engine.begin() as sa_conn:
    raw = (await sa_conn.get_raw_connection()).driver_connection
    await dispatcher.emit(raw, Mutation("acme", "users", "users/42", Op.PUT, {"plan": "pro"}))
    await sa_conn.execute(text("UPDATE accounts SET plan = 'pro' WHERE id = 42"))
    raise HostFailed
"""


async def test_emitting_before_sqlalchemy_begins_is_refused(
    engine: AsyncEngine, conn: asyncpg.Connection
) -> None:
    # The README's old form, emitting first, then failing: the emit is refused instead of
    # committing a row the host's rollback cannot reach.
    with pytest.raises(TransactionRequired, match="emit must run inside your transaction"):
        await run("from sqlalchemy import text\n" + OLD_RECIPE, engine)
    assert await state(conn) == ("free", [])

    # What the refusal prevents, here asked for on purpose: the row commits on its own.
    opted_out = OLD_RECIPE.replace('{"plan": "pro"}))', '{"plan": "pro"}), autocommit=True)')
    assert opted_out != OLD_RECIPE
    with pytest.raises(HostFailed):
        await run("from sqlalchemy import text\n" + opted_out, engine)
    assert await state(conn) == ("free", ["users/42"])
