"""Invoke the ``dispatcher`` CLI in-process, as a shell would, and check its results.

Shared by test_cli.py and test_cli_flow.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio.to_thread
from click.testing import CliRunner, Result

from dispatcher.cli import main

# Nothing from the environment of whoever runs the tests.
CLEAN_ENV: dict[str, str | None] = {
    "DATABASE_URL": None,
    "DISPATCHER_SCHEMA": None,
    "DISPATCHER_LOG_LEVEL": None,
    "DISPATCHER_LOOP": None,
}


async def run(*args: str) -> Result:
    """Invoke the CLI in a worker thread: it runs its own event loop, as it would in a shell."""
    runner = CliRunner(env=CLEAN_ENV)
    return await anyio.to_thread.run_sync(lambda: runner.invoke(main, list(args)))


async def ok(*args: str) -> Result:
    result = await run(*args)
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return result


async def ok_json(*args: str) -> Any:
    return json.loads((await ok(*args, "--json")).stdout)


def assert_error(result: Result, *, code: int = 1, contains: str = "") -> str:
    """A failed command: the expected exit status, no traceback, an ``Error:`` line."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    lines = err.splitlines()
    if code == 1:
        assert len(lines) == 1, err
    assert lines[-1].startswith("Error: "), err
    assert contains in lines[-1], err
    return lines[-1]


REPO = Path(__file__).resolve().parents[2]


def run_process(dsn: str, *args: str) -> list[str]:
    """``dispatcher run`` as a process of its own (``--log-level INFO``), with the handlers
    the compose file runs; ``args`` are more options of ``run``."""
    return [
        sys.executable,
        "-m",
        "dispatcher.cli",
        "--log-level",
        "INFO",
        "run",
        "--dsn",
        dsn,
        "--handlers",
        "examples.compose_handlers:handlers",
        *args,
    ]


def process_env() -> dict[str, str]:
    """This environment without the test runner's database or dispatcher settings, with the
    repository importable (``examples`` lives there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DISPATCH"))}
    env["PYTHONPATH"] = str(REPO)
    return env
