"""``dispatcher run --loop``: the process on uvloop drains what was emitted and stops on
SIGTERM; without uvloop, ``--loop uvloop`` (or ``DISPATCHER_LOOP=uvloop``) is a usage error
with the install hint, and nothing starts.

"Not installed" is real to the process: a directory ahead of site-packages on its
``PYTHONPATH`` holds a ``uvloop`` package whose import fails exactly as a missing one's does.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import anyio
import asyncpg
import pytest
from cli_run import REPO, process_env, run_process

from dispatcher import Mutation, Op, TriggerRegistry, emit_many

pytestmark = pytest.mark.anyio

ROWS = 50
HINT = (
    "Error: Invalid value for '--loop': uvloop is not installed: pip install 'dispatcher[uvloop]'"
)


async def quote_rows(conn: asyncpg.Connection) -> None:
    """``ROWS`` due rows for the demo's quote target, which always succeeds."""
    await TriggerRegistry().register(
        conn,
        scope="acme",
        name="quote",
        namespace="orders",
        key_pattern="orders/*",
        target="demo.quote",
        registered_by="user:1",
    )
    mutations = [Mutation("acme", "orders", f"orders/{i}", Op.PUT, {"qty": i}) for i in range(ROWS)]
    await emit_many(conn, mutations, autocommit=True)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == ROWS


async def test_run_on_uvloop_drains_and_stops_on_sigterm(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await quote_rows(conn)
    with anyio.fail_after(60):
        async with await anyio.open_process(
            run_process(dsn, "--poll-interval", "0.05", "--loop", "uvloop"),
            cwd=REPO,
            env=process_env(),
            stdout=subprocess.DEVNULL,
        ) as process:
            assert process.stderr is not None
            err = b""
            try:
                while b"dispatcher started" not in err:
                    err += await process.stderr.receive()
                # Durable state: every row executed and removed.
                while True:
                    if not await conn.fetchval("SELECT count(*) FROM dispatcher.outbox"):
                        break
                    await anyio.sleep(0.05)
            finally:
                process.send_signal(signal.SIGTERM)
                async for chunk in process.stderr:
                    err += chunk
                code = await process.wait()
    text = err.decode()
    assert code == 0, text
    # The class of the loop the dispatcher ran in, read from inside it.
    assert "event=cli.loop loop=uvloop.Loop" in text, text
    assert "SIGTERM: stopping gracefully" in text
    assert "dispatcher stopped" in text
    assert "Traceback" not in text
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters") == 0


@pytest.mark.parametrize("how", ["option", "environment"])
async def test_uvloop_missing_is_a_usage_error_with_the_install_hint(
    dsn: str, tmp_path: Path, how: str
) -> None:
    shadow = tmp_path / "uvloop"
    shadow.mkdir()
    # What importing an absent package raises.
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'uvloop'\", name='uvloop')\n"
    )
    env = process_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    args: tuple[str, ...] = ("--loop", "uvloop")
    if how == "environment":
        env["DISPATCHER_LOOP"] = "uvloop"
        args = ()
    done = await anyio.run_process(run_process(dsn, *args), cwd=REPO, env=env, check=False)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.strip().splitlines()[-1] == HINT, err
    assert "Usage: " in err
    # Refused while parsing: no loop, no connection, no dispatcher.
    assert "event loop" not in err
    assert "dispatcher started" not in err
    assert "Traceback" not in err


async def test_run_freezes_what_it_loaded_before_it_starts(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    # A handler that tells, from inside the running process, how many objects the
    # collector no longer walks (gc.freeze() moved them to the permanent generation).
    (tmp_path / "freeze_probe.py").write_text(
        "import gc\n"
        "import dispatcher\n"
        "handlers = dispatcher.HandlerRegistry()\n"
        "@handlers.handler('probe')\n"
        "async def probe(ctx):\n"
        "    await ctx.kv.put('probes', 'frozen', gc.get_freeze_count())\n"
    )
    await TriggerRegistry().register(
        conn,
        scope="acme",
        name="probe",
        namespace="orders",
        key_pattern="orders/*",
        target="probe",
        registered_by="user:1",
    )
    await emit_many(conn, [Mutation("acme", "orders", "orders/1", Op.PUT, 1)], autocommit=True)
    env = process_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    command = run_process(dsn, "--poll-interval", "0.05")
    command[command.index("examples.compose_handlers:handlers")] = "freeze_probe:handlers"
    read = "SELECT value::text::bigint FROM dispatcher.kv WHERE key = 'frozen'"
    with anyio.fail_after(60):
        async with await anyio.open_process(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as process:
            try:
                # Durable state: the handler's write.
                while True:
                    frozen = await conn.fetchval(read)
                    if frozen is not None:
                        break
                    await anyio.sleep(0.05)
            finally:
                process.send_signal(signal.SIGTERM)
                code = await process.wait()
    assert code == 0
    # Everything imported by then (the CLI, asyncpg, SQLAlchemy's metadata, the handlers).
    assert frozen > 10_000
