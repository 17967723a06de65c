"""``dispatcher demo`` as a new user meets it: what it says, the input it refuses, what it
leaves behind, and one line (no traceback) when it cannot run."""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from pathlib import Path

import anyio
import asyncpg
import pytest
from cli_run import assert_error, ok, run
from click.testing import Result

from dispatcher.admin import Admin, DeadLetterFilter
from dispatcher.core.errors import InvalidInput
from dispatcher.demo import MAX_ORDERS, SCOPE, run_demo
from dispatcher.kv import KvStore
from dispatcher.runtime.dispatcher import Dispatcher
from dispatcher.runtime.handlers import HandlerRegistry
from dispatcher.triggers import TriggerRegistry

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
TRIGGER_NAMES = ("flaky", "broken", "dead-letters", "loop", "quote")
# Not dispatcher.cli.demo's attribute: the package exports the command under that name.
demo_cli = importlib.import_module("dispatcher.cli.demo")
_without_password = demo_cli._without_password


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DISPATCH"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def _table_rows(result: Result, label: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(f"│ {label} ")]


def _count(result: Result, label: str) -> int:
    [row] = _table_rows(result, label)
    return int(row.split("│")[2])


async def test_demo_names_its_scenario_explains_its_output_and_cleans_up(
    dsn: str, conn: asyncpg.Connection
) -> None:
    result = await ok("demo", "--dsn", dsn, "--orders", "20")
    out = result.stdout
    assert "Five triggers in the scope 'demo', each showing one part of the flow:" in out
    for name, pattern in zip(
        TRIGGER_NAMES,
        ("orders/*", "billing/*", "billing/*", "counters/loop", "quotes/*"),
        strict=True,
    ):
        assert any(line.split()[:2] == [name, pattern] for line in out.splitlines()), name
    assert "One transaction writes 20 orders" in out
    assert "(200: the handler answered the caller)" in out
    assert "  quote qty=2: 200 {'price': 19.0}" in out
    assert "slow quote: no reply within 0.1 s, on purpose" in out
    # One table, every line explained, the database's rows in it.
    assert len(_table_rows(result, "executed")) == 1, out
    assert "handler calls, retries included" in out
    assert _count(result, "dead_letters rows") == _count(result, "… handled") == 3
    assert _count(result, "abandoned_executions") == 1
    assert out.rstrip().endswith(
        "Done; the demo's triggers and keys were removed (--keep leaves them, to inspect "
        "with the other commands)."
    )
    # Cleaned up: no trigger (so nothing fires on the demo's keys), no key.
    assert await TriggerRegistry().list(conn, scope=SCOPE) == []
    for namespace in ("orders", "billing", "counters", "alerts"):
        assert await KvStore().list(conn, SCOPE, namespace) == []
    letters = await Admin().list_dead_letters(conn, DeadLetterFilter(scope=SCOPE))
    assert [x.resolution.value for x in letters] == ["handled"] * 3


async def test_keep_with_dsn_leaves_the_rows_and_prints_the_commands(
    dsn: str, conn: asyncpg.Connection
) -> None:
    result = await ok("demo", "--dsn", dsn, "--orders", "5", "--keep")
    assert [t.name for t in await TriggerRegistry().list(conn, scope=SCOPE)] == sorted(
        TRIGGER_NAMES
    )
    assert len(await KvStore().list(conn, SCOPE, "orders")) == 5
    assert len(await KvStore().list(conn, SCOPE, "alerts")) == 3
    shown = _without_password(dsn)  # the test server's DSN may have one
    status = shlex.join(["dispatcher", "status", "--dsn", shown])
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert status in lines, result.stdout
    # The commands printed work as printed.
    for line in lines[lines.index(status) :]:
        if line.startswith("dispatcher "):
            printed = await ok(*[dsn if a == shown else a for a in shlex.split(line)[1:]])
            assert printed.stdout.strip()
    listed = await ok("dead-letters", "list", "--scope", "demo", "--dsn", dsn)
    assert listed.stdout.count("handled") == 3


def test_a_dsn_password_is_not_echoed() -> None:
    assert _without_password("postgresql://app:s3cret@db:5432/app?sslmode=require") == (
        "postgresql://app:PASSWORD@db:5432/app?sslmode=require"
    )
    assert _without_password("postgresql://app@db/app") == "postgresql://app@db/app"
    assert _without_password("postgresql://postgres:@/postgres?host=/tmp/pg") == (
        "postgresql://postgres:@/postgres?host=/tmp/pg"
    )


async def test_a_second_run_on_the_same_schema_reuses_the_triggers(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await ok("demo", "--dsn", dsn, "--orders", "3", "--keep")
    before = {t.name: t.id for t in await TriggerRegistry().list(conn, scope=SCOPE)}
    await ok("demo", "--dsn", dsn, "--orders", "3", "--keep")
    after = {t.name: t.id for t in await TriggerRegistry().list(conn, scope=SCOPE)}
    assert after == before


@pytest.mark.parametrize("orders", ["-5", "0", str(MAX_ORDERS + 1)])
async def test_orders_out_of_range_is_a_usage_error(
    dsn: str, conn: asyncpg.Connection, orders: str
) -> None:
    result = await run("demo", "--dsn", dsn, "--orders", orders)
    assert_error(result, code=2, contains="Invalid value for '--orders'")
    assert f"{orders} is not in the range 1<=x<={MAX_ORDERS}" in result.stderr
    assert await TriggerRegistry().list(conn) == []  # nothing was started


async def test_the_library_refuses_the_same_counts(dsn: str) -> None:
    from rich.console import Console

    # The command keeps its own copy (so that `dispatcher --help` need not import the demo).
    assert demo_cli.MAX_ORDERS == MAX_ORDERS
    for orders in (-5, 0, MAX_ORDERS + 1, True):
        with pytest.raises(InvalidInput, match="orders"):
            await run_demo(dsn, Console(quiet=True), orders=orders)


async def test_without_the_embedded_extra_one_line_says_what_to_install() -> None:
    """The real import failure: ``pgserver`` cannot be imported in the child process."""
    blocked = (
        "import sys; sys.modules['pgserver'] = None; "  # `import pgserver` now raises
        "from dispatcher.cli import main; main(['demo'])"
    )
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-c", blocked], cwd=REPO, env=_clean_env(), check=False
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "Error: the demo needs Postgres: give --dsn (or set DATABASE_URL), or install the "
        "embedded server with `pip install 'dispatcher[embedded]'`"
    ]
    assert done.stdout == b""


async def test_a_worker_already_running_is_named_in_one_line(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """A worker with circuit breakers (the default) and without the demo's handlers takes
    the demo's rows as they are written: the demo stops at once and says why, instead of
    waiting a minute and printing a traceback."""
    worker = Dispatcher(dsn, HandlerRegistry())
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            result = await run("demo", "--dsn", dsn, "--orders", "20")
            worker.stop()
    line = assert_error(result, contains="another dispatcher")
    assert line.endswith("stop it, or run the demo against another database or --schema")
    assert len(_table_rows(result, "executed")) == 1


async def test_a_schema_with_other_scopes_is_refused(dsn: str, conn: asyncpg.Connection) -> None:
    await TriggerRegistry().register(
        conn,
        scope="acme",
        name="welcome",
        namespace="users",
        key_pattern="users/*",
        target="send_welcome",
        registered_by="user:7",
    )
    result = await run("demo", "--dsn", dsn, "--orders", "5")
    assert_error(result, contains="holds triggers of other scopes (acme)")
    assert [t.scope for t in await TriggerRegistry().list(conn)] == ["acme"]


async def test_another_schema_keeps_the_demo_apart(dsn: str, conn: asyncpg.Connection) -> None:
    """--schema: the demo migrates and uses its own tables, nothing in the default ones."""
    await TriggerRegistry().register(
        conn,
        scope="acme",
        name="welcome",
        namespace="users",
        key_pattern="users/*",
        target="send_welcome",
        registered_by="user:7",
    )
    result = await ok("demo", "--dsn", dsn, "--schema", "demo_s", "--orders", "5", "--keep")
    assert shlex.join(["dispatcher", "status", "--dsn", dsn, "--schema", "demo_s"]) in result.stdout
    kept = await TriggerRegistry(schema="demo_s").list(conn, scope=SCOPE)
    assert len(kept) == len(TRIGGER_NAMES)
    assert await TriggerRegistry().list(conn, scope=SCOPE) == []
    assert await Admin().list_dead_letters(conn) == []
    assert len(await Admin(schema="demo_s").list_dead_letters(conn)) == 3


async def test_keep_with_the_embedded_server_leaves_it_running() -> None:
    """No DSN: the demo starts an embedded server and, with --keep, leaves it running after
    its process exits, with the commands to inspect it and to stop it."""
    with anyio.fail_after(110):
        done = await anyio.run_process(
            [sys.executable, "-m", "dispatcher.cli", "demo", "--orders", "3", "--keep"],
            cwd=REPO,
            env=_clean_env(),
            check=False,
        )
        out = done.stdout.decode()
        lines = [line.strip() for line in out.splitlines()]
        stop = [line for line in lines if line.startswith(shlex.quote(sys.executable))]
        try:
            assert done.returncode == 0, done.stderr.decode()
            [status] = [line for line in lines if line.startswith("dispatcher status --dsn ")]
            printed = await ok(*shlex.split(status)[1:])
            assert "handled" in printed.stdout
        finally:
            assert len(stop) == 1, out
            stopped = await anyio.run_process(shlex.split(stop[0]), check=False)
        assert stopped.returncode == 0, stopped.stderr.decode()
        data_dir = out.split("(its files: ", 1)[1].split(")", 1)[0]
        assert not await anyio.Path(data_dir).exists()
        dsn = shlex.split(status)[-1]
        with pytest.raises(FileNotFoundError):  # the server's socket is gone with it
            await asyncpg.connect(dsn)
