"""Every host connection emits in its own transaction: asyncpg, psycopg 3 (sync and async),
SQLAlchemy connections and sessions (sync and async, two drivers each) and Django.

For each: committing writes the outbox rows with the triggers' policy snapshot and the
wake-up hint, rolling back leaves none, and a call outside a transaction is refused with
an error that says how to open one. All paths write identical rows for the same mutations.
Sync hosts run in a worker thread, as they would in a threaded server (Django refuses to
run inside an event loop's thread).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import asyncpg
import psycopg
import pytest
from django.conf import settings
from sqlalchemy import create_engine, make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import NullPool

import dispatcher
from dispatcher import Mutation, Op, RetryPolicy, TransactionRequired
from dispatcher.core.errors import InvalidInput
from dispatcher.emit import _LAST_NOTIFY, encode_event
from dispatcher.sql import POLICY_COLUMNS

pytestmark = pytest.mark.anyio

POLICY = ", ".join(POLICY_COLUMNS)
# Two triggers with different policies: users/42 matches both, users/7 only the first.
WELCOME = RetryPolicy(kind="linear", base_delay=2, factor=1, max_delay=60, max_attempts=7)
AUDIT = RetryPolicy(kind="constant", base_delay=5, max_attempts=3, max_event_age=3600)

Action = Literal["commit", "rollback", "outside"]


class Rollback(Exception):
    """The host's work failing inside its transaction, after the emits."""


def mutations() -> list[Mutation]:
    root = uuid.uuid4()
    return [
        Mutation(
            "acme",
            "users",
            "users/42",
            Op.PUT,
            {"plan": "pro", "name": "Zoë", "n": 1.5},
            old={"plan": "free", "name": "Zoë"},
        ),
        # A bulk call mixing a mutation without an old value and one with.
        Mutation("acme", "users", "users/7", Op.PUT, [1, {"a": None}], depth=2, root_id=root),
        Mutation("acme", "users", "users/43", Op.DELETE, old=["was", {"here": True}]),
    ]


# How each host emits: the first mutation alone, the rest in one bulk call.


async def emit_async(conn: Any, ms: Sequence[Mutation]) -> None:
    await dispatcher.emit(conn, ms[0])
    await dispatcher.emit_many(conn, ms[1:])


def emit_sync(conn: Any, ms: Sequence[Mutation]) -> None:
    dispatcher.emit_sync(conn, ms[0])
    dispatcher.emit_many_sync(conn, ms[1:])


async def refused_async(conn: Any, ms: Sequence[Mutation]) -> list[str]:
    with pytest.raises(TransactionRequired) as single:
        await dispatcher.emit(conn, ms[0])
    with pytest.raises(TransactionRequired) as bulk:
        await dispatcher.emit_many(conn, ms[1:])
    return [str(single.value), str(bulk.value)]


def refused_sync(conn: Any, ms: Sequence[Mutation]) -> list[str]:
    with pytest.raises(TransactionRequired) as single:
        dispatcher.emit_sync(conn, ms[0])
    with pytest.raises(TransactionRequired) as bulk:
        dispatcher.emit_many_sync(conn, ms[1:])
    return [str(single.value), str(bulk.value)]


# The hosts. Each runs one action and returns the refusal messages ("outside") or nothing;
# "rollback" raises Rollback after emitting.


def url(dsn: str, driver: str) -> str:
    return make_url(dsn).set(drivername=f"postgresql+{driver}").render_as_string(False)


async def on_asyncpg(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        if action == "outside":
            return await refused_async(conn, ms)
        async with conn.transaction():
            await emit_async(conn, ms)
            if action == "rollback":
                raise Rollback
        return []
    finally:
        await conn.close()


async def on_asyncpg_pool(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        if action == "outside":
            return await refused_async(conn, ms)
        async with conn.transaction():
            await emit_async(conn, ms)
            if action == "rollback":
                raise Rollback
        return []


async def on_psycopg_async(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        if action == "outside":
            return await refused_async(conn, ms)
        async with conn.transaction():
            await emit_async(conn, ms)
            if action == "rollback":
                raise Rollback
        return []


def on_psycopg(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
    # Not in autocommit mode: `with connect()` would commit at its end whatever the emit
    # began, so an emit before the transaction is refused all the same.
    with psycopg.connect(dsn) as conn:
        if action == "outside":
            return refused_sync(conn, ms)
        with conn.transaction():
            emit_sync(conn, ms)
            if action == "rollback":
                raise Rollback
        return []


def on_sa_connection(driver: str) -> Callable[[str, Action, Sequence[Mutation]], list[str]]:
    def run(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
        engine = create_engine(url(dsn, driver), poolclass=NullPool)
        try:
            if action == "outside":
                with engine.connect() as conn:
                    return refused_sync(conn, ms)
            with engine.begin() as conn:
                emit_sync(conn, ms)
                if action == "rollback":
                    raise Rollback
            return []
        finally:
            engine.dispose()

    return run


def on_sa_session(
    driver: str, *, scoped: bool = False
) -> Callable[[str, Action, Sequence[Mutation]], list[str]]:
    def run(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
        engine = create_engine(url(dsn, driver), poolclass=NullPool)
        factory = sessionmaker(engine)
        session: Any = scoped_session(factory) if scoped else factory()
        try:
            if action == "outside":
                return refused_sync(session, ms)
            with session.begin():
                emit_sync(session, ms)
                if action == "rollback":
                    raise Rollback
            return []
        finally:
            session.close()
            engine.dispose()

    return run


def on_sa_async_connection(
    driver: str,
) -> Callable[[str, Action, Sequence[Mutation]], Awaitable[list[str]]]:
    async def run(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
        engine = create_async_engine(url(dsn, driver), poolclass=NullPool)
        try:
            if action == "outside":
                async with engine.connect() as conn:
                    return await refused_async(conn, ms)
            async with engine.begin() as conn:
                await emit_async(conn, ms)
                if action == "rollback":
                    raise Rollback
            return []
        finally:
            await engine.dispose()

    return run


def on_sa_async_session(
    driver: str,
) -> Callable[[str, Action, Sequence[Mutation]], Awaitable[list[str]]]:
    async def run(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
        engine = create_async_engine(url(dsn, driver), poolclass=NullPool)
        try:
            async with AsyncSession(engine) as session:
                if action == "outside":
                    return await refused_async(session, ms)
                async with session.begin():
                    await emit_async(session, ms)
                    if action == "rollback":
                        raise Rollback
            return []
        finally:
            await engine.dispose()

    return run


@contextmanager
def django_database(dsn: str) -> Iterator[None]:
    """Django's default alias pointed at ``dsn``, for the calling thread."""
    from django.db import connections

    parts = make_url(dsn)
    # A socket directory comes as ?host=… (the embedded server's DSN), not in the authority.
    host = parts.query.get("host", "")
    connections.settings["default"].update(
        NAME=parts.database,
        USER=parts.username or "",
        PASSWORD=parts.password or "",
        HOST=parts.host or (host if isinstance(host, str) else host[0]),
        PORT=str(parts.port or parts.query.get("port", "")),
    )
    try:
        yield
    finally:
        connections.close_all()


def on_django(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
    from django.db import transaction

    from dispatcher.contrib import django as dispatcher_django

    with django_database(dsn):
        if action == "outside":
            with pytest.raises(TransactionRequired) as single:
                dispatcher_django.emit(ms[0])
            with pytest.raises(TransactionRequired) as bulk:
                dispatcher_django.emit_many(ms[1:])
            return [str(single.value), str(bulk.value)]
        with transaction.atomic():
            dispatcher_django.emit(ms[0])
            dispatcher_django.emit_many(ms[1:], using="default")
            if action == "rollback":
                raise Rollback
        return []


def on_django_connection(dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
    """Django's ``connection`` handed to emit_sync like any sync connection."""
    from django.db import connection, transaction

    with django_database(dsn):
        if action == "outside":
            return refused_sync(connection, ms)
        with transaction.atomic():
            emit_sync(connection, ms)
            if action == "rollback":
                raise Rollback
        return []


@dataclass(frozen=True)
class Host:
    name: str
    run: Callable[[str, Action, Sequence[Mutation]], Any]
    sync: bool
    # What the refusal tells this host to do.
    hint: str

    async def __call__(self, dsn: str, action: Action, ms: Sequence[Mutation]) -> list[str]:
        if self.sync:
            result: list[str] = await anyio.to_thread.run_sync(self.run, dsn, action, ms)
        else:
            result = await self.run(dsn, action, ms)
        return result


HOSTS = [
    Host("asyncpg", on_asyncpg, False, "`async with conn.transaction():`"),
    Host("asyncpg-pool", on_asyncpg_pool, False, "`async with conn.transaction():`"),
    Host("psycopg", on_psycopg, True, "`with conn.transaction():`"),
    Host("psycopg-async", on_psycopg_async, False, "`async with conn.transaction():`"),
    Host("sa-connection-psycopg", on_sa_connection("psycopg"), True, "`with engine.begin()"),
    Host("sa-connection-psycopg2", on_sa_connection("psycopg2"), True, "`with engine.begin()"),
    Host("sa-session-psycopg", on_sa_session("psycopg"), True, "`with session.begin():`"),
    Host("sa-session-psycopg2", on_sa_session("psycopg2"), True, "`with session.begin():`"),
    Host(
        "sa-scoped-session-psycopg2",
        on_sa_session("psycopg2", scoped=True),
        True,
        "`with session.begin():`",
    ),
    Host(
        "sa-async-connection-asyncpg",
        on_sa_async_connection("asyncpg"),
        False,
        "`async with engine.begin()",
    ),
    Host(
        "sa-async-connection-psycopg",
        on_sa_async_connection("psycopg"),
        False,
        "`async with engine.begin()",
    ),
    Host(
        "sa-async-session-asyncpg",
        on_sa_async_session("asyncpg"),
        False,
        "`async with session.begin():`",
    ),
    Host(
        "sa-async-session-psycopg",
        on_sa_async_session("psycopg"),
        False,
        "`async with session.begin():`",
    ),
    Host("django", on_django, True, "`with transaction.atomic(using='default'):`"),
    Host(
        "django-connection",
        on_django_connection,
        True,
        "`with transaction.atomic(using='default'):`",
    ),
]


@pytest.fixture(scope="module", autouse=True)
def django_setup() -> None:
    """Django configured once for this module; each test points the alias at its database."""
    import django

    if not settings.configured:
        settings.configure(
            DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": ""}},
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()


@pytest.fixture
async def triggers(conn: asyncpg.Connection) -> dict[str, int]:
    registry = dispatcher.TriggerRegistry()
    common = {"scope": "acme", "namespace": "users", "registered_by": "user:7"}
    welcome = await registry.register(
        conn, name="welcome", key_pattern="users/*", target="send_welcome", retry=WELCOME, **common
    )
    audit = await registry.register(
        conn, name="audit", key_pattern="users/4?", target="audit", retry=AUDIT, **common
    )
    return {"welcome": welcome.id, "audit": audit.id}


async def outbox(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """The outbox rows, in a fixed order, without what differs between runs (ids, times)."""
    rows = await conn.fetch(
        "SELECT event_id, trigger_id, scope, trigger_name, target, registered_by, payload,"
        f" depth, attempts, lease_token, reply_to, dead_letter_id, {POLICY}"
        " FROM dispatcher.outbox ORDER BY event_id, trigger_id"
    )
    return [{**r, "payload": json.loads(r["payload"])} for r in rows]


async def assert_enqueued(
    conn: asyncpg.Connection, ms: Sequence[Mutation], triggers: dict[str, int]
) -> None:
    rows = await outbox(conn)
    expected = sorted(
        [(m.event_id, triggers["welcome"]) for m in ms]
        + [(m.event_id, triggers["audit"]) for m in ms if m.key in ("users/42", "users/43")]
    )
    assert [(r["event_id"], r["trigger_id"]) for r in rows] == expected
    by_event = {m.event_id: m for m in ms}
    snapshots = {
        r["id"]: dict(r) for r in await conn.fetch(f"SELECT id, {POLICY} FROM dispatcher.triggers")
    }
    for row in rows:
        m = by_event[row["event_id"]]
        assert row["payload"] == json.loads(encode_event(m, max_bytes=1 << 20))
        assert row["depth"] == m.depth
        assert row["payload"]["root"] == str(m.root)
        assert (row["payload"]["value"], row["payload"]["old"]) == (m.value, m.old)
        assert {c: row[c] for c in POLICY_COLUMNS} == {
            c: snapshots[row["trigger_id"]][c] for c in POLICY_COLUMNS
        }
    welcome = next(r for r in rows if r["trigger_name"] == "welcome")
    audit = next(r for r in rows if r["trigger_name"] == "audit")
    assert (welcome["retry_kind"], welcome["max_attempts"]) == ("linear", WELCOME.max_attempts)
    assert (audit["retry_kind"], audit["max_attempts"]) == ("constant", AUDIT.max_attempts)


@asynccontextmanager
async def wake_up_hint(dsn: str) -> AsyncIterator[anyio.Event]:
    """An event set by the dispatcher's wake-up notification."""
    listener = await asyncpg.connect(dsn)
    woken = anyio.Event()
    await listener.add_listener("dispatcher_wake", lambda *_: woken.set())
    try:
        yield woken
    finally:
        await listener.close()


@pytest.mark.parametrize("host", HOSTS, ids=[h.name for h in HOSTS])
async def test_commit_rollback_and_outside_a_transaction(
    host: Host, dsn: str, conn: asyncpg.Connection, triggers: dict[str, int]
) -> None:
    ms = mutations()

    # Outside a transaction: refused, saying how to open one for this host; nothing written.
    for message in await host(dsn, "outside", ms):
        assert host.hint in message
        assert "autocommit=True" in message
    assert await outbox(conn) == []

    with pytest.raises(Rollback):
        await host(dsn, "rollback", ms)
    assert await outbox(conn) == []

    # The hint is sent at most once per interval from a process: forget the last one.
    _LAST_NOTIFY.clear()
    async with wake_up_hint(dsn) as woken:
        await host(dsn, "commit", ms)
        with anyio.fail_after(5):
            await woken.wait()
    await assert_enqueued(conn, ms, triggers)


async def test_every_host_writes_identical_rows(
    dsn: str, conn: asyncpg.Connection, triggers: dict[str, int]
) -> None:
    ms = mutations()
    written: dict[str, list[dict[str, Any]]] = {}
    for host in HOSTS:
        await host(dsn, "commit", ms)
        written[host.name] = await outbox(conn)
        await conn.execute("DELETE FROM dispatcher.outbox")
    first = written["asyncpg"]
    assert len(first) == 5
    for name, rows in written.items():
        assert rows == first, name


async def test_autocommit_isolation_is_refused_and_the_opt_out_commits(
    dsn: str, conn: asyncpg.Connection, triggers: dict[str, int]
) -> None:
    ms = mutations()

    def sync_autocommit_engine() -> None:
        engine = create_engine(url(dsn, "psycopg2"), isolation_level="AUTOCOMMIT")
        try:
            # SQLAlchemy reports a transaction here, but the driver commits every statement.
            with engine.begin() as sa_conn, Session(sa_conn) as session:
                assert sa_conn.in_transaction()
                with pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
                    dispatcher.emit_sync(sa_conn, ms[0])
                with session.begin(), pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
                    dispatcher.emit_sync(session, ms[0])
        finally:
            engine.dispose()

    await anyio.to_thread.run_sync(sync_autocommit_engine)

    engine = create_async_engine(url(dsn, "asyncpg"), isolation_level="AUTOCOMMIT")
    try:
        async with AsyncSession(engine) as session, session.begin():
            with pytest.raises(TransactionRequired, match="AUTOCOMMIT"):
                await dispatcher.emit(session, ms[0])
    finally:
        await engine.dispose()
    assert await outbox(conn) == []

    # autocommit=True: the rows commit on their own, as asked.
    def psycopg_autocommit() -> None:
        with psycopg.connect(dsn, autocommit=True) as pg:
            dispatcher.emit_sync(pg, ms[0], autocommit=True)
            dispatcher.emit_many_sync(pg, ms[1:], autocommit=True)

    await anyio.to_thread.run_sync(psycopg_autocommit)
    await assert_enqueued(conn, ms, triggers)


async def test_the_wrong_call_for_a_connection_says_which_to_use(
    dsn: str, conn: asyncpg.Connection
) -> None:
    m = mutations()[0]
    with pytest.raises(InvalidInput, match=r"async connection \(Connection\): await dispatcher"):
        dispatcher.emit_sync(conn, m)
    sync_match = r"sync connection \(Connection\): call dispatcher"
    with psycopg.connect(dsn) as pg, pytest.raises(InvalidInput, match=sync_match):
        await dispatcher.emit(pg, m)
    engine = create_async_engine(url(dsn, "asyncpg"), poolclass=NullPool)
    try:
        with pytest.raises(InvalidInput, match="An engine or a pool is not a transaction"):
            await dispatcher.emit(engine, m)
    finally:
        await engine.dispose()
    assert await outbox(conn) == []


def test_import_without_django_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("django", "django.db"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "dispatcher.contrib.django", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'dispatcher\[django\]'"):
        importlib.import_module("dispatcher.contrib.django")


def test_importing_dispatcher_loads_no_host_driver() -> None:
    code = (
        "import sys, dispatcher; print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('psycopg', 'psycopg2', 'django', 'asyncpg') or m.startswith('sqlalchemy.orm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
