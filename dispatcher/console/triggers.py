"""The triggers page: every trigger with its pattern, policy and condition, whether it is
enabled or paused, and the actions enable, disable, pause and resume."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dispatcher.console.context import console_of
from dispatcher.console.security import action_form


async def list_triggers(request: Request) -> Response:
    console = console_of(request)
    async with console.connection() as conn:
        triggers = [t for t in await console.registry.list(conn) if console.within(t.scope)]
        pauses = await console.flow.pauses(conn)
    paused_ids = {p.trigger_id for p in pauses if p.trigger_id is not None}
    paused_scopes = {p.scope for p in pauses if p.scope is not None}
    everything = any(p.scope is None and p.trigger_id is None for p in pauses)
    return console.render(
        request,
        "triggers.html",
        {
            "triggers": triggers,
            "paused_ids": paused_ids,
            "paused_scopes": paused_scopes,
            "everything_paused": everything,
            "notice": request.query_params.get("notice"),
        },
    )


async def set_enabled(request: Request) -> Response:
    console = console_of(request)
    form = await action_form(request, console.settings)
    id: int = request.path_params["id"]
    enable = form.get("enabled") == "1"
    async with console.connection() as conn, conn.transaction():
        trigger = await console.trigger_in_scope(conn, id)
        if trigger is None:
            # Only a registered trigger can be enabled: say so as the library does.
            trigger = await console.registry.get(conn, id)
        if enable:
            changed = await console.registry.enable(conn, id)
        else:
            changed = await console.registry.disable(conn, id)
        verb = "enabled" if changed.enabled else "disabled"
        await console.audit(
            conn,
            request,
            f"triggers.{'enable' if enable else 'disable'}",
            count=1,
            scope=trigger.scope,
            target=f"trigger {id} ({trigger.name})",
        )
    return console.back(request, "triggers", f"{verb} trigger {id} ({trigger.name})")


routes = [
    Route("/triggers", list_triggers, name="triggers"),
    Route("/triggers/{id:int}/enabled", set_enabled, methods=["POST"], name="trigger_enabled"),
]
