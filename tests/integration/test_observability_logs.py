"""Logs that keep their fields: ``dispatcher run`` as a real subprocess against a real database,
with a trigger that always fails, writes its dead letter as one JSON object per line (or, as
text, with its fields as key=value)."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import anyio
import asyncpg
import pytest
from cli_run import REPO, process_env, run_process

from dispatcher import Mutation, Op, TriggerRegistry, emit
from dispatcher.testing import instant_retries


async def broken_trigger(conn: asyncpg.Connection) -> None:
    """A trigger whose target always raises (the demo's), dead-lettered after 2 attempts."""
    await TriggerRegistry().register(
        conn,
        scope="acme",
        name="charge",
        namespace="billing",
        key_pattern="billing/*",
        target="demo.broken",
        registered_by="user:1",
        retry=instant_retries(2),
    )
    await emit(conn, Mutation("acme", "billing", "billing/7", Op.PUT, {"n": 7}), autocommit=True)


async def run_until(dsn: str, args: tuple[str, ...], marker: bytes) -> tuple[int, str]:
    """Run ``dispatcher run`` until ``marker`` shows on stderr, stop it with SIGTERM; its exit
    status and whole stderr."""
    with anyio.fail_after(60):
        async with await anyio.open_process(
            run_process(dsn, "--poll-interval", "0.05", *args),
            cwd=REPO,
            env=process_env(),
            stdout=subprocess.DEVNULL,
        ) as process:
            assert process.stderr is not None
            err = b""
            try:
                while marker not in err:
                    err += await process.stderr.receive()
            finally:
                process.send_signal(signal.SIGTERM)
                async for chunk in process.stderr:
                    err += chunk
                code = await process.wait()
    return code, err.decode()


@pytest.mark.anyio
async def test_run_writes_json_lines_with_their_fields(dsn: str, conn: asyncpg.Connection) -> None:
    await broken_trigger(conn)
    code, err = await run_until(
        dsn, ("--log-format", "json"), b'"event": "dispatcher.dead_lettered"'
    )
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line is one JSON object
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= line.keys(), line
        by_event.setdefault(line.get("event", ""), []).append(line)
    [dead] = by_event["dispatcher.dead_lettered"]
    assert dead["level"] == "WARNING"
    assert dead["logger"] == "dispatcher.settle"
    assert dead["message"] == "row dead-lettered"
    assert dead["trigger"] == "charge"
    assert dead["scope"] == "acme"
    assert dead["reason"] == "handler_error"
    assert dead["attempts"] == 2
    assert dead["ts"].endswith("Z")
    [started] = by_event["dispatcher.started"]
    assert started["schema"] == "dispatcher"
    # The command's own lines are JSON too.
    [stopping] = by_event["cli.stopping"]
    assert stopping["signal"] == "SIGTERM"
    assert by_event["dispatcher.stopped"]
    assert "" not in by_event, by_event.get("")  # every record has an event name


@pytest.mark.anyio
async def test_run_text_lines_keep_their_fields(dsn: str, conn: asyncpg.Connection) -> None:
    await broken_trigger(conn)
    code, err = await run_until(dsn, (), b"row dead-lettered")
    assert code == 0, err
    [line] = [x for x in err.splitlines() if "row dead-lettered" in x]
    assert line.endswith(
        "WARNING dispatcher.settle: row dead-lettered event=dispatcher.dead_lettered "
        "trigger=charge scope=acme reason=handler_error attempts=2"
    ), line
