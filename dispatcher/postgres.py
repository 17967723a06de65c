"""Find a Postgres server for tests and the demo.

In order: a DSN from the environment; a testcontainers container when a Docker engine
answers; otherwise an embedded server from the ``pgserver`` wheel (extra ``embedded``), so a
machine with only Python can run everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer
    from testcontainers.postgres import PostgresContainer

log = logging.getLogger("dispatcher.postgres")

Source = Literal["env", "testcontainers", "embedded"]


class ServerControl(Protocol):
    """Stop and start the server (fault-injection tests); absent for an external DSN."""

    def stop(self) -> None: ...
    def start(self) -> None: ...
    def crash(self) -> None:
        """Stop at once, as a power cut would: what was not flushed to disk is lost."""
        ...


class EmbeddedServerMissing(RuntimeError):
    """The embedded server's wheel, ``pgserver`` (extra ``embedded``), is not installed."""


@dataclass
class ProvidedPostgres:
    dsn: str
    source: Source
    control: ServerControl | None = field(default=None)
    # The embedded server's data directory (None for the other sources).
    data_dir: Path | None = field(default=None)


def with_database(dsn: str, database: str) -> str:
    """The same DSN pointing at another database (URL form ``postgresql://…/dbname?…``)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {parts.scheme!r}")
    return urlunsplit(parts._replace(path="/" + quote(database)))


def docker_available() -> bool:
    """True when a Docker engine answers within a second."""
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure to reach an engine means "no Docker here"
        return False


@contextlib.contextmanager
def provide_postgres(
    env_var: str, *, image: str = "postgres:16-alpine"
) -> Iterator[ProvidedPostgres]:
    """Yield a running server, cleaned up on exit; see the module docstring for the order."""
    dsn = os.environ.get(env_var)
    if dsn:
        log.info("using Postgres from %s", env_var, extra={"event": "postgres.env"})
        yield ProvidedPostgres(dsn, "env")
        return
    if docker_available():
        with _container(image) as provided:
            yield provided
        return
    with embedded_postgres() as provided:
        yield provided


@contextlib.contextmanager
def _container(image: str) -> Iterator[ProvidedPostgres]:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(image, driver=None)
    container.start()
    try:
        dsn = container.get_connection_url()
        yield ProvidedPostgres(dsn, "testcontainers", _ContainerControl(container))
    finally:
        container.stop()


@dataclass
class _ContainerControl:
    container: PostgresContainer

    def stop(self) -> None:
        self.container.get_wrapped_container().stop()

    def start(self) -> None:
        self.container.get_wrapped_container().start()

    def crash(self) -> None:
        self.container.get_wrapped_container().kill()


@contextlib.contextmanager
def embedded_postgres(
    data_dir: Path | None = None, *, keep: bool = False
) -> Iterator[ProvidedPostgres]:
    """Start a throw-away server from the ``pgserver`` wheel; stop it and delete its files.

    With ``keep``, a body that returns normally leaves the server running and its files in
    ``data_dir`` (:func:`stop_embedded_command` stops it); a body that raises still stops it.
    Raises :class:`EmbeddedServerMissing` without the ``embedded`` extra.
    """
    pgserver = _import_pgserver()
    owned = data_dir is None
    path = Path(tempfile.mkdtemp(prefix="dispatcher-pg-")) if data_dir is None else data_dir
    server = pgserver.get_server(path, cleanup_mode="stop")
    kept = False
    try:
        yield ProvidedPostgres(server.get_uri(), "embedded", _EmbeddedControl(server), path)
        kept = keep
    finally:
        if kept:
            # Let go of this process's handle only: pgserver stops a server when its last
            # handle goes, unless the handle's cleanup mode is None.
            server.cleanup_mode = None
            server.cleanup()
        else:
            server.cleanup()
            if owned:
                shutil.rmtree(path, ignore_errors=True)


def stop_embedded_command(data_dir: Path) -> list[str]:
    """The command (argv) that stops a server :func:`embedded_postgres` kept, and deletes its
    files: pgserver's own API run by this interpreter, so it works from any shell.

    >>> stop_embedded_command(Path("/tmp/dispatcher-pg-x"))[-1]
    'import pgserver; pgserver.get_server("/tmp/dispatcher-pg-x", cleanup_mode="delete").cleanup()'
    """
    # A JSON string is a Python string literal; double quotes keep the shell quoting simple.
    path = json.dumps(str(data_dir))
    statement = f'import pgserver; pgserver.get_server({path}, cleanup_mode="delete").cleanup()'
    # -W ignore: pgserver warns at import when XDG_RUNTIME_DIR is unset (see _import_pgserver).
    return [sys.executable, "-W", "ignore", "-c", statement]


def _import_pgserver() -> ModuleType:
    # pgserver resolves a runtime directory at import time and warns when XDG_RUNTIME_DIR is
    # unset (containers, CI); the fallback it picks is fine for a throw-away server.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError:
            raise EmbeddedServerMissing(
                "no Postgres available: set a DSN, run a Docker engine, or install the "
                "embedded server with `pip install 'dispatcher[embedded]'`"
            ) from None
    return pgserver


@dataclass
class _EmbeddedControl:
    server: PostgresServer

    def stop(self) -> None:
        self._pg_ctl_stop("fast")

    def crash(self) -> None:
        # Immediate mode: the server exits without writing its WAL buffers.
        self._pg_ctl_stop("immediate")

    def _pg_ctl_stop(self, mode: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(self.server.pgdata),
                "-w",
                "-m",
                mode,
                "stop",
            ],
            user=self.server.system_user,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        self.server.ensure_postgres_running()
