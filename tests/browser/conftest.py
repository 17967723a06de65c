"""Real Chromium against a real console over a real Postgres.

One browser per module (Debian's ``chromium``, launched by path: nothing is
downloaded); each test gets its own database (a clone of the migrated template, as
``tests/conftest.py`` makes them), a console served by uvicorn on a socket of its own, and a
fresh browser context. The tests are synchronous (Playwright's sync API); seeding and
checking the database run in an event loop of their own, on a worker thread (Playwright's
sync API keeps one running on the test's thread).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import pytest
from browser_support import Served, in_loop

from dispatcher.postgres import ProvidedPostgres, with_database

T = TypeVar("T")

CHROMIUM = os.environ.get("DISPATCHER_CHROMIUM") or shutil.which("chromium") or ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM:
        return
    # Only where Chromium is absent (a developer machine): CI installs it (.ci/run).
    skip = pytest.mark.skip(reason="no chromium on PATH: apt-get install chromium")
    for item in items:
        if "tests/browser" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def browser(template_dsn: str) -> Iterator[Any]:
    # Module scope: while Playwright runs, its event loop occupies this thread, and the
    # async tests of other modules (anyio) cannot start theirs. template_dsn first, for
    # the same reason: its setup runs an event loop.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def db(postgres: ProvidedPostgres, template_dsn: str) -> Iterator[str]:
    """A fresh, migrated database for this test only (as ``tests/conftest.py``'s ``dsn``)."""
    # The database name is the URL's path; the embedded server's URLs carry a socket
    # directory in their query, which may hold slashes.
    template = urlsplit(template_dsn).path.lstrip("/")
    name = f"dispatcher_b_{uuid.uuid4().hex[:12]}"
    in_loop(_execute, postgres.dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    yield with_database(postgres.dsn, name)
    in_loop(_execute, postgres.dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Serve a console app with uvicorn on a socket of its own; stopped after the test.

    The socket listens before the server starts, so the browser's first request waits in
    its backlog instead of racing the startup."""
    import uvicorn

    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any, host: str = "127.0.0.1") -> Served:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(64)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread))
        port = sock.getsockname()[1]
        return Served(f"http://127.0.0.1:{port}", app)

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the console's server did not stop"
