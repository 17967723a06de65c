"""The console as an ASGI application: :func:`create_app`.

Standalone (``dispatcher console``) or mounted in a host's Starlette or FastAPI app::

    from dispatcher.console import ConsoleSettings, create_app, auth_from_env

    console = create_app(ConsoleSettings(dsn, auth=auth_from_env(), scopes=("acme",)))
    app.mount("/dispatcher", console)

The console opens its own small connection pool on its first request (a mounted app gets no
lifespan events from its host) and closes it on the lifespan's shutdown when it has one, or
when the host awaits ``console.state.console.aclose()``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from dispatcher.console import audit_page, dead_letters, overview, triggers
from dispatcher.console.context import Console, console_of
from dispatcher.console.security import Guard
from dispatcher.console.settings import ConsoleSettings
from dispatcher.core.errors import DispatcherError, TriggerNotFound

HERE = Path(__file__).parent


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return console_of(request).render(
        request, "error.html", {"message": exc.detail}, status_code=exc.status_code
    )


async def _library_error(request: Request, exc: Exception) -> Response:
    # What the operator typed or named was refused by the library: say what, as it says it.
    status = 404 if isinstance(exc, LookupError | TriggerNotFound) else 400
    return console_of(request).render(
        request, "error.html", {"message": str(exc)}, status_code=status
    )


async def _postgres_error(request: Request, exc: Exception) -> Response:
    # The tables are not what this version reads: the schema is missing or behind.
    return console_of(request).render(
        request,
        "error.html",
        {
            "message": f"Postgres error: {exc}. Are dispatcher's tables in schema "
            f"{console_of(request).settings.schema!r}, migrated (`dispatcher migrate`)?"
        },
        status_code=500,
    )


def _ts(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float | None) -> str:
    """A wait, as an operator reads it: ``42s``, ``3m 12s``, ``2h 5m``, ``3d 4h``."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for size, unit, sub_size, sub_unit in ((86_400, "d", 3_600, "h"), (3_600, "h", 60, "m")):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size}{sub_unit}"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def _pretty(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def create_app(settings: ConsoleSettings) -> Starlette:
    """The console for ``settings``, as an ASGI application.

    >>> app = create_app(ConsoleSettings(dsn, read_only=True))
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(ts=_ts, ago=_ago, pretty=_pretty, compact=_compact)
    templates = Jinja2Templates(env=env)
    console = Console(settings, templates)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await console.aclose()

    routes = [
        *overview.routes,
        *dead_letters.routes,
        *triggers.routes,
        *audit_page.routes,
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, settings=settings)],
        exception_handlers={
            HTTPException: _http_error,
            DispatcherError: _library_error,
            asyncpg.UndefinedTableError: _postgres_error,
            asyncpg.UndefinedColumnError: _postgres_error,
        },
        lifespan=lifespan,
    )
    app.state.console = console
    return app


__all__ = ["create_app"]
