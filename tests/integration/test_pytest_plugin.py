"""The pytest plugin as a user meets it: pytester runs small test modules of a user's.

Most runs go through a subprocess, which loads the plugin from its entry point as a user's
pytest does and imports nothing of this session's; the one that stops at configuration stays
in process.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from dispatcher.postgres import ProvidedPostgres, with_database
from dispatcher.pytest_plugin import DATABASE_PREFIX, TEMPLATE_PREFIX

pytest_plugins = ["pytester"]

DOCS = Path(__file__).parents[2] / "docs" / "testing.md"

# Loaded with -p before the entry-point plugins: makes the optional extras (and docker)
# unimportable, so no fallback server can be found.
BLOCKER = """
import sys

for name in ("pgserver", "testcontainers", "docker"):
    sys.modules[name] = None
"""


@pytest.fixture
def no_env_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPATCHER_TEST_DSN", raising=False)


def doc_blocks() -> tuple[str, str]:
    """The pyproject.toml snippet and the test module of docs/testing.md's example."""
    text = DOCS.read_text()
    example = text.split("\n## Example\n", 1)[1]
    toml = re.search(r"```toml\n(.*?)```", example, re.S)
    module = re.search(r"```python\n(.*?)```", example, re.S)
    assert toml is not None
    assert module is not None
    return toml.group(1), module.group(1)


def database_names(server_dsn: str) -> set[str]:
    async def query() -> set[str]:
        conn = await asyncpg.connect(server_dsn)
        try:
            return {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        finally:
            await conn.close()

    return anyio.run(query)


def test_the_documented_example_passes_as_configured_there(
    pytester: pytest.Pytester,
    postgres: ProvidedPostgres,
    monkeypatch: pytest.MonkeyPatch,
    no_env_server: None,
) -> None:
    toml, module = doc_blocks()
    pytester.makepyprojecttoml(toml)
    pytester.makepyfile(test_welcome=module, blocker=BLOCKER)
    # Only the variable the ini option names leads to the server: no fallback is importable.
    monkeypatch.setenv("TEST_DATABASE_URL", postgres.dsn)

    result = pytester.runpytest_subprocess("-p", "blocker", "-W", "error", timeout=90)

    result.assert_outcomes(passed=3)


def test_each_test_gets_a_fresh_database_and_nothing_is_left_behind(
    pytester: pytest.Pytester, postgres: ProvidedPostgres
) -> None:
    pytester.makepyfile(
        test_user="""
        import json
        import os

        import asyncpg
        import pytest

        from dispatcher import TriggerRegistry
        from dispatcher.testing import instant_retries

        pytestmark = pytest.mark.anyio
        SEEN = []


        @pytest.fixture
        def anyio_backend():
            return "asyncio"


        async def record(conn, dsn):
            templates = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1",
                f"dispatcher_template_{os.getpid()}_%",
            )
            triggers = await conn.fetchval("SELECT count(*) FROM dispatcher.triggers")
            SEEN.append({"dsn": dsn, "templates": [r[0] for r in templates],
                         "triggers_before": triggers})
            with open("seen.json", "w") as f:
                json.dump(SEEN, f)


        async def register(conn):
            await TriggerRegistry().register(
                conn, scope="acme", name="t", namespace="users", key_pattern="users/*",
                target="t", registered_by="user:1", retry=instant_retries(1),
            )


        async def test_fails_after_writing(dispatcher_dsn, dispatcher_conn):
            await record(dispatcher_conn, dispatcher_dsn)
            await register(dispatcher_conn)
            assert False, "a failed test still has its database dropped"


        async def test_leaves_a_connection_open(dispatcher_dsn, dispatcher_conn):
            await record(dispatcher_conn, dispatcher_dsn)
            await register(dispatcher_conn)
            # Not closed: the drop after the test ends it.
            left_open = await asyncpg.connect(dispatcher_dsn)
            assert await left_open.fetchval("SELECT 1") == 1


        async def test_sees_none_of_it(dispatcher_dsn, dispatcher_conn):
            await record(dispatcher_conn, dispatcher_dsn)
        """
    )

    result = pytester.runpytest_subprocess(f"--dispatcher-dsn={postgres.dsn}", timeout=90)

    result.assert_outcomes(passed=2, failed=1)
    seen = json.loads((pytester.path / "seen.json").read_text())
    assert [s["triggers_before"] for s in seen] == [0, 0, 0]
    names = [urlsplit(s["dsn"]).path.lstrip("/") for s in seen]
    assert len(set(names)) == 3
    assert all(n.startswith(DATABASE_PREFIX) for n in names)
    assert [with_database(postgres.dsn, n) for n in names] == [s["dsn"] for s in seen]
    [template] = seen[0]["templates"]
    assert template.startswith(TEMPLATE_PREFIX)
    assert all(s["templates"] == [template] for s in seen)
    left = database_names(postgres.dsn)
    assert set(names).isdisjoint(left)
    assert template not in left


def test_a_sync_test_gets_every_schema_named_in_the_ini_file(
    pytester: pytest.Pytester, postgres: ProvidedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini(
        """
        [pytest]
        dispatcher_dsn_env = MY_PG
        dispatcher_schemas =
            dispatcher
            tenant_a
        """
    )
    pytester.makepyfile(
        test_sync="""
        import anyio
        import asyncpg

        from dispatcher.migrate import current_revision, head_revision


        def test_both_schemas_are_at_head(dispatcher_dsn):
            async def revisions():
                return [await current_revision(dispatcher_dsn, schema=s)
                        for s in ("dispatcher", "tenant_a", "tenant_b")]

            assert anyio.run(revisions) == [head_revision(), head_revision(), None]
        """
    )
    monkeypatch.setenv("MY_PG", postgres.dsn)

    result = pytester.runpytest_subprocess("-W", "error", timeout=90)

    result.assert_outcomes(passed=1)


def test_nothing_is_imported_or_contacted_until_a_fixture_is_asked_for(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_lazy="""
        import sys


        def test_plain():
            heavy = ("asyncpg", "alembic", "sqlalchemy", "pgserver", "testcontainers")
            assert [m for m in heavy if m in sys.modules] == []


        def test_wants_a_database(dispatcher_dsn):
            pass
        """
    )
    # Nothing listens on port 1: only a test that asks for a database finds out.
    result = pytester.runpytest_subprocess(
        "--dispatcher-dsn=postgresql://someone:s3cret@127.0.0.1:1/nothing", timeout=60
    )

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*dispatcher_dsn could not connect to the Postgres of --dispatcher-dsn: *"]
    )
    assert "s3cret" not in result.stdout.str()


def test_without_a_server_or_the_extras_it_says_what_to_set_or_install(
    pytester: pytest.Pytester, no_env_server: None
) -> None:
    pytester.makepyfile(
        blocker=BLOCKER,
        test_none="""
        def test_plain():
            pass


        def test_wants_a_database(dispatcher_dsn):
            pass
        """,
    )

    result = pytester.runpytest_subprocess("-p", "blocker", "-W", "error", timeout=60)

    result.assert_outcomes(passed=1, errors=1)
    output = result.stdout.str()
    assert "dispatcher_dsn found no Postgres server" in output
    for hint in (
        "--dispatcher-dsn",
        "DISPATCHER_TEST_DSN",
        "pip install 'dispatcher[embedded]'",
        "pip install 'testcontainers[postgres]'",
    ):
        assert hint in output


def test_a_server_that_is_not_a_url_is_refused_without_echoing_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_dsn="""
        def test_wants_a_database(dispatcher_dsn):
            pass
        """
    )
    monkeypatch.setenv("DISPATCHER_TEST_DSN", "host=db password=s3cret")

    result = pytester.runpytest()

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*$DISPATCHER_TEST_DSN must be a postgresql:// URL*"])
    assert "s3cret" not in result.stdout.str()


def test_a_role_that_may_not_create_databases_is_told_so(
    pytester: pytest.Pytester, postgres: ProvidedPostgres
) -> None:
    role = f"dispatcher_nocreatedb_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(postgres.dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    as_role = parts._replace(netloc=f"{role}:pw@{host}").geturl()

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    anyio.run(admin, f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw' NOCREATEDB")
    try:
        pytester.makepyfile(
            test_role="""
            def test_wants_a_database(dispatcher_dsn):
                pass
            """
        )
        result = pytester.runpytest_subprocess(f"--dispatcher-dsn={as_role}", timeout=60)
    finally:
        anyio.run(admin, f'DROP ROLE "{role}"')

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*the role of --dispatcher-dsn may not create databases: grant it CREATEDB*"]
    )
