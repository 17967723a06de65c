"""What every route of the console shares (:class:`Console`), and how a route finds it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from dispatcher.admin import Admin, AuditEntry
from dispatcher.console.security import CSRF_FIELD
from dispatcher.console.settings import ConsoleSettings
from dispatcher.core.errors import TriggerNotFound
from dispatcher.core.models import JsonValue, Trigger
from dispatcher.db import Connection
from dispatcher.flow import FlowControl
from dispatcher.triggers import TriggerRegistry


@dataclass
class Console:
    """What every route shares: the settings, the library's admin objects, the pool."""

    settings: ConsoleSettings
    templates: Jinja2Templates
    admin: Admin = field(init=False)
    flow: FlowControl = field(init=False)
    registry: TriggerRegistry = field(init=False)
    _pool: asyncpg.Pool | None = None
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    def __post_init__(self) -> None:
        self.admin = Admin(self.settings.schema)
        self.flow = FlowControl(self.settings.schema)
        self.registry = TriggerRegistry(self.settings.schema)

    async def pool(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.settings.dsn,
                    min_size=0,
                    max_size=self.settings.pool_size,
                    server_settings={
                        "application_name": "dispatcher-console",
                        # The admin statements test "$n IS NULL OR ..." per filter field:
                        # only a plan made for the actual values uses the right index (a
                        # generic plan, which Postgres may switch to after five executions
                        # of a prepared statement, would scan).
                        "plan_cache_mode": "force_custom_plan",
                    },
                )
            return self._pool

    async def aclose(self) -> None:
        async with self._lock:
            if self._pool is not None:
                await self._pool.close()
                self._pool = None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        pool = await self.pool()
        async with pool.acquire() as conn:
            yield conn

    def render(
        self, request: Request, template: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        base = {
            "settings": self.settings,
            "actor": getattr(request.state, "actor", None),
            "csrf": getattr(request.state, "csrf", ""),
            "csrf_field": CSRF_FIELD,
        }
        return self.templates.TemplateResponse(
            request, template, {**base, **context}, status_code=status_code
        )

    def within(self, scope: str | None) -> bool:
        """Whether the operator may see and act on ``scope`` (None: several or all scopes,
        which only an operator without a scope limit may)."""
        scopes = self.settings.scopes
        return scopes is None or (scope is not None and scope in scopes)

    async def trigger_in_scope(self, conn: Connection, trigger_id: int) -> Trigger | None:
        """The trigger, when the operator may act on it. A deleted trigger (None) may still
        have a pause, parked rows or a breaker: only an operator of every scope may act on
        those. Raises a 404 for a trigger outside the operator's scopes."""
        try:
            trigger = await self.registry.get(conn, trigger_id)
        except TriggerNotFound:
            if self.settings.scopes is None:
                return None
            raise HTTPException(404, f"no trigger {trigger_id} in this console's scopes") from None
        if not self.within(trigger.scope):
            raise HTTPException(404, f"no trigger {trigger_id} in this console's scopes")
        return trigger

    async def audit(
        self,
        conn: Connection,
        request: Request,
        action: str,
        *,
        count: int,
        scope: str | None = None,
        target: str | None = None,
        filter: Mapping[str, JsonValue] | None = None,
        detail: Mapping[str, JsonValue] | None = None,
    ) -> None:
        """Record an action in the audit log; call it in the action's transaction."""
        await self.admin.record_action(
            conn,
            AuditEntry(
                actor=request.state.actor,
                action=action,
                count=count,
                scope=scope,
                target=target,
                filter=filter,
                detail=detail,
            ),
        )

    def back(self, request: Request, route: str, notice: str, **params: object) -> Response:
        """Send the browser to the page ``route`` (a route name, never a URL the request
        gave), with ``notice`` shown at its top."""
        url = request.url_for(route, **params).include_query_params(notice=notice)
        return self.redirect(str(url))

    def redirect(self, url: str) -> Response:
        """After an action: the browser asks for ``url`` with a GET (303)."""
        return RedirectResponse(url, status_code=303)


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console
