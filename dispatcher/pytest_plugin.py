"""pytest fixtures for your own tests: a fresh, migrated dispatcher database per test.

pytest loads this plugin by itself wherever dispatcher is installed (entry point
``pytest11``, name ``dispatcher``; ``-p no:dispatcher`` turns it off). It costs nothing until
a test requests one of its fixtures:

- ``dispatcher_dsn`` — the URL of a database of its own for this test, migrated, dropped
  afterwards. A plain (sync) fixture, usable from any test.
- ``dispatcher_conn`` — an asyncpg connection to it, closed afterwards (async tests).
- ``dispatcher_postgres`` — the session's server, a :class:`~dispatcher.postgres.ProvidedPostgres`.

The server is, in order: ``--dispatcher-dsn URL``; the environment variable named by the ini
option ``dispatcher_dsn_env`` (default ``DISPATCHER_TEST_DSN``); a testcontainers container
when a Docker engine answers; an embedded server (extra ``embedded``). The schemas of the ini
option ``dispatcher_schemas`` (default ``dispatcher``) are migrated once per session into a
template database, and each test gets a clone of it. docs/testing.md has the details and a
complete example.

>>> async def test_welcome(dispatcher_dsn: str, dispatcher_conn: asyncpg.Connection) -> None:
...     async with dispatcher_conn.transaction():
...         await emit(dispatcher_conn, Mutation("acme", "users", "users/1", Op.PUT, {}))
...     stats = await drain(dispatcher_dsn, handlers, time_limit=10)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

# Everything heavier (asyncpg, alembic, anyio's portal, the server providers) is imported by
# the fixtures that need it: pytest imports this module in every run wherever dispatcher is
# installed, and most of those runs never ask for a database.
if TYPE_CHECKING:
    import asyncpg
    from anyio.from_thread import BlockingPortal

    from dispatcher.postgres import ProvidedPostgres

DEFAULT_ENV_VAR = "DISPATCHER_TEST_DSN"
DEFAULT_SCHEMAS = ("dispatcher",)
# Every session names its databases apart (the template by pid and a random part, a test's
# by a random part), so that parallel sessions (pytest-xdist workers, CI jobs) can share one
# server; a leftover template's pid tells its owner.
TEMPLATE_PREFIX = "dispatcher_template_"
DATABASE_PREFIX = "dispatcher_test_"

_INSTALL_HINT = (
    "give it a server with --dispatcher-dsn=postgresql://… or the environment variable "
    "{env_var} (the ini option dispatcher_dsn_env names another), or install a fallback: "
    "`pip install 'dispatcher[embedded]'` for an embedded server, or "
    "`pip install 'testcontainers[postgres]'` with a running Docker engine"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dispatcher", "dispatcher test databases (dispatcher_dsn fixture)")
    group.addoption(
        "--dispatcher-dsn",
        metavar="URL",
        default=None,
        help="postgresql:// URL of the server on which dispatcher_dsn creates its databases; "
        "wins over the environment variable named by dispatcher_dsn_env",
    )
    parser.addini(
        "dispatcher_dsn_env",
        "environment variable holding the postgresql:// URL of the server for dispatcher_dsn "
        f"(default: {DEFAULT_ENV_VAR}); unset, a testcontainers or embedded server is started",
        default=DEFAULT_ENV_VAR,
    )
    parser.addini(
        "dispatcher_schemas",
        "schemas dispatcher_dsn migrates, one per line (default: dispatcher)",
        type="linelist",
        default=list(DEFAULT_SCHEMAS),
    )


@dataclass(frozen=True)
class _Settings:
    dsn: str | None
    origin: str
    env_var: str
    schemas: tuple[str, ...]


def _settings(config: pytest.Config) -> _Settings:
    env_var = str(config.getini("dispatcher_dsn_env")).strip() or DEFAULT_ENV_VAR
    schemas = tuple(str(s) for s in config.getini("dispatcher_schemas")) or DEFAULT_SCHEMAS
    option = config.getoption("dispatcher_dsn")
    if option:
        return _Settings(str(option), "--dispatcher-dsn", env_var, schemas)
    return _Settings(os.environ.get(env_var) or None, f"${env_var}", env_var, schemas)


class _SetupError(Exception):
    """A reason the fixtures cannot run, reported as the test's error without a traceback."""


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    try:
        yield
    except _SetupError as exc:
        pytest.fail(str(exc), pytrace=False)


@contextlib.contextmanager
def _server(settings: _Settings) -> Iterator[ProvidedPostgres]:
    from dispatcher.postgres import ProvidedPostgres, provide_postgres

    if settings.dsn is not None:
        if urlsplit(settings.dsn).scheme not in ("postgres", "postgresql"):
            # The value itself stays out of the message: it may hold a password.
            raise _SetupError(
                f"{settings.origin} must be a postgresql:// URL, e.g. "
                "postgresql://postgres@127.0.0.1:5432/postgres"
            )
        yield ProvidedPostgres(settings.dsn, "env")
        return
    if not any(importlib.util.find_spec(m) for m in ("pgserver", "testcontainers")):
        raise _SetupError(
            "dispatcher_dsn found no Postgres server: "
            + _INSTALL_HINT.format(env_var=settings.env_var)
        )
    # provide_postgres reads the variable again (unset) and goes on to its fallbacks.
    with provide_postgres(settings.env_var) as provided:
        yield provided


@pytest.fixture(scope="session")
def dispatcher_postgres(pytestconfig: pytest.Config) -> Iterator[ProvidedPostgres]:
    """The Postgres server of this session, on which ``dispatcher_dsn`` creates databases.

    ``.dsn`` is the URL you gave (or that of the started server's default database),
    ``.source`` one of ``env`` (given), ``testcontainers``, ``embedded``.
    """
    with _reported(), _server(_settings(pytestconfig)) as provided:
        yield provided


@dataclass
class _Databases:
    """The session's template and admin connection, on an event loop in a thread of its own:
    the fixtures then work from sync tests and under any async test runner alike, and never
    touch the test's own event loop."""

    portal: BlockingPortal
    admin: asyncpg.Connection
    template: str

    def create(self) -> str:
        name = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:16]}"
        self.portal.call(self.admin.execute, f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    def drop(self, name: str) -> None:
        # FORCE ends connections a test left open (a pool, a dispatcher still running).
        self.portal.call(self.admin.execute, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _dispatcher_databases(
    pytestconfig: pytest.Config, dispatcher_postgres: ProvidedPostgres
) -> Iterator[_Databases]:
    from anyio.from_thread import start_blocking_portal

    settings = _settings(pytestconfig)
    template = f"{TEMPLATE_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _reported(), start_blocking_portal("asyncio") as portal:
        admin = portal.call(_connect_admin, dispatcher_postgres, settings)
        try:
            portal.call(_create_template, admin, dispatcher_postgres, template, settings)
            yield _Databases(portal, admin, template)
        finally:
            try:
                portal.call(admin.execute, f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
            finally:
                portal.call(admin.close)


async def _connect_admin(server: ProvidedPostgres, settings: _Settings) -> asyncpg.Connection:
    import asyncpg

    try:
        admin = await asyncpg.connect(server.dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise _SetupError(
            f"dispatcher_dsn could not connect to the Postgres of {_origin(server, settings)}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if server.source != "env":
        # A throw-away server we started: trade durability for speed. Never done to a server
        # we were handed.
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            await admin.execute(f"ALTER SYSTEM SET {setting} = off")
        await admin.execute("SELECT pg_reload_conf()")
    return admin


def _origin(server: ProvidedPostgres, settings: _Settings) -> str:
    return settings.origin if server.source == "env" else f"the {server.source} server"


async def _create_template(
    admin: asyncpg.Connection, server: ProvidedPostgres, template: str, settings: _Settings
) -> None:
    import asyncpg

    from dispatcher.migrate import migrate
    from dispatcher.postgres import with_database

    try:
        await admin.execute(f'CREATE DATABASE "{template}"')
    except asyncpg.InsufficientPrivilegeError:
        raise _SetupError(
            "dispatcher_dsn creates a database per test, and the role of "
            f"{_origin(server, settings)} may not create databases: grant it CREATEDB "
            "(ALTER ROLE … CREATEDB), or use a server where it may"
        ) from None
    dsn = with_database(server.dsn, template)
    for schema in settings.schemas:
        await migrate(dsn, schema=schema)


@pytest.fixture
def dispatcher_dsn(
    dispatcher_postgres: ProvidedPostgres, _dispatcher_databases: _Databases
) -> Iterator[str]:
    """The postgresql:// URL of a fresh database for this test only, migrated (the schemas
    of the ini option ``dispatcher_schemas``), dropped after the test."""
    from dispatcher.postgres import with_database

    name = _dispatcher_databases.create()
    try:
        yield with_database(dispatcher_postgres.dsn, name)
    finally:
        _dispatcher_databases.drop(name)


@pytest.fixture
async def dispatcher_conn(dispatcher_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to ``dispatcher_dsn``, closed after the test (async tests only:
    mark them ``anyio``, with an ``anyio_backend`` fixture returning ``"asyncio"``)."""
    import asyncpg

    conn = await asyncpg.connect(dispatcher_dsn)
    try:
        yield conn
    finally:
        await conn.close()
