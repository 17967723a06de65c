"""The overview page (backlog and lag per trigger, dead letters per hour, breakers, pauses,
parked rows, abandoned executions, blocked keys), the live counts it refreshes, and the
flow-control actions it offers: pause, resume, unpark, breaker reset, unblock."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dispatcher.console.context import Console, console_of
from dispatcher.console.security import action_form
from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import check_name
from dispatcher.db import Connection
from dispatcher.flow import MAX_UNPARK_BATCH, Pause

ABANDONED_SHOWN = 10
BACKLOG_SHOWN = 50
BLOCKED_SHOWN = 100


async def overview(request: Request) -> Response:
    console = console_of(request)
    scopes = console.settings.scopes
    async with console.connection() as conn:
        counts = await console.admin.live_counts(conn, scopes)
        backlog = await console.admin.backlog_by_trigger(conn, scopes, BACKLOG_SHOWN)
        per_hour = await console.admin.dead_letters_per_hour(conn, counts.at, scopes)
        triggers = [t for t in await console.registry.list(conn) if console.within(t.scope)]
        scope_of = {t.id: t.scope for t in triggers}
        pauses = [p for p in await console.flow.pauses(conn) if _visible(console, p, scope_of)]
        breakers = [b for b in await console.flow.breakers(conn) if console.within(b.scope)]
        parked = [p for p in await console.flow.parked_summary(conn) if console.within(p.scope)]
        single = scopes[0] if scopes is not None and len(scopes) == 1 else None
        abandoned = [
            a
            for a in await console.admin.list_abandoned(conn, 100, scope=single)
            if console.within(a.scope)
        ][:ABANDONED_SHOWN]
        blocked = [
            k
            for k in await console.flow.blocked_keys(conn, scope=single, limit=BLOCKED_SHOWN)
            if console.within(k.scope)
        ]
    peak = max((h.letters for h in per_hour), default=0)
    return console.render(
        request,
        "overview.html",
        {
            "counts": counts,
            "backlog": backlog,
            "per_hour": per_hour,
            "peak": peak,
            "pauses": pauses,
            "breakers": breakers,
            "parked": parked,
            "abandoned": abandoned,
            "triggers": triggers,
            "scopes": sorted({t.scope for t in triggers}),
            "blocked_keys": blocked,
            "notice": request.query_params.get("notice"),
        },
    )


def _visible(console: Console, p: Pause, scope_of: dict[int, str]) -> bool:
    if p.trigger_id is not None:
        return console.settings.scopes is None or p.trigger_id in scope_of
    return console.within(p.scope)


async def counts(request: Request) -> Response:
    """The live counts, as a fragment the pages poll (htmx)."""
    console = console_of(request)
    async with console.connection() as conn:
        live = await console.admin.live_counts(conn, console.settings.scopes)
    return console.render(request, "_counts.html", {"counts": live})


def _target(form: dict[str, str]) -> tuple[str | None, int | None, bool]:
    scope = form.get("scope") or None
    trigger = form.get("trigger_id") or None
    everything = form.get("everything") == "1"
    trigger_id = None
    if trigger is not None:
        if not trigger.isdigit():
            raise InvalidInput("trigger_id", trigger, "must be a trigger id")
        trigger_id = int(trigger)
    if scope is not None:
        check_name("scope", scope)
    return scope, trigger_id, everything


async def _checked_target(
    console: Console,
    conn: Connection,
    scope: str | None,
    trigger_id: int | None,
    everything: bool,
) -> str | None:
    """The scope the action touches, once the operator may act on the target."""
    if trigger_id is not None:
        trigger = await console.trigger_in_scope(conn, trigger_id)
        return None if trigger is None else trigger.scope
    if scope is not None:
        if not console.within(scope):
            raise HTTPException(404, f"scope {scope} is not one this console may act on")
        return scope
    if everything and console.settings.scopes is not None:
        raise HTTPException(403, "This console is limited to some scopes: it cannot pause all.")
    return None


async def pause(request: Request) -> Response:
    console = console_of(request)
    form = await action_form(request, console.settings)
    scope, trigger_id, everything = _target(form)
    note = form.get("note") or None
    async with console.connection() as conn, conn.transaction():
        touched = await _checked_target(console, conn, scope, trigger_id, everything)
        p = await console.flow.pause(
            conn, scope=scope, trigger_id=trigger_id, everything=everything, note=note
        )
        await console.audit(
            conn,
            request,
            "flow.pause",
            count=1,
            scope=touched,
            target=p.target,
            detail=None if note is None else {"note": note},
        )
    return console.back(request, _return_to(form), f"paused {p.target}")


async def resume(request: Request) -> Response:
    console = console_of(request)
    form = await action_form(request, console.settings)
    scope, trigger_id, everything = _target(form)
    async with console.connection() as conn, conn.transaction():
        touched = await _checked_target(console, conn, scope, trigger_id, everything)
        target = await console.flow.resume_target(
            conn, scope=scope, trigger=trigger_id, everything=everything
        )
        await console.audit(conn, request, "flow.resume", count=1, scope=touched, target=target)
    return console.back(request, _return_to(form), f"resumed {target}")


async def unpark(request: Request) -> Response:
    console = console_of(request)
    form = await action_form(request, console.settings)
    scope, trigger_id, _ = _target(form)
    limit_text = form.get("limit") or str(MAX_UNPARK_BATCH)
    if not limit_text.isdigit():
        raise InvalidInput("limit", limit_text, "must be a number of rows")
    async with console.connection() as conn, conn.transaction():
        if trigger_id is None and scope is None and console.settings.scopes is not None:
            raise HTTPException(403, "This console is limited to some scopes: name a trigger.")
        touched = await _checked_target(console, conn, scope, trigger_id, False)
        n = await console.flow.unpark(
            conn, trigger_id=trigger_id, scope=scope, limit=int(limit_text)
        )
        what = f"trigger {trigger_id}" if trigger_id is not None else f"scope {scope or 'any'}"
        await console.audit(conn, request, "flow.unpark", count=n, scope=touched, target=what)
    return console.back(request, "overview", f"un-parked {n} rows of {what}")


async def reset_breaker(request: Request) -> Response:
    console = console_of(request)
    form = await action_form(request, console.settings)
    _, trigger_id, _ = _target(form)
    if trigger_id is None:
        raise InvalidInput("trigger_id", None, "name the trigger whose breaker to reset")
    async with console.connection() as conn, conn.transaction():
        touched = await _checked_target(console, conn, None, trigger_id, False)
        target = await console.flow.reset_breaker_of(conn, trigger_id)
        await console.audit(
            conn, request, "flow.reset_breaker", count=1, scope=touched, target=target
        )
    return console.back(request, "overview", f"reset the breaker of {target}")


async def unblock(request: Request) -> Response:
    """Skip a blocked key's dead head: the key's later rows run; its dead letter stays."""
    console = console_of(request)
    form = await action_form(request, console.settings)
    _, trigger_id, _ = _target(form)
    key = form.get("key") or None
    if trigger_id is None or key is None:
        raise InvalidInput("key", key, "name the trigger and the key to unblock")
    async with console.connection() as conn, conn.transaction():
        touched = await _checked_target(console, conn, None, trigger_id, False)
        n = await console.flow.unblock(conn, trigger_id, key)
        target = f"trigger {trigger_id} key {key}"
        await console.audit(conn, request, "flow.unblock", count=n, scope=touched, target=target)
    done = f"unblocked {key}" if n else f"{key} was not blocked"
    return console.back(request, "overview", done)


def _return_to(form: dict[str, str]) -> str:
    # Only pages of this console, by route name: never a URL the request carries.
    return "triggers" if form.get("return_to") == "triggers" else "overview"


routes = [
    Route("/", overview, name="overview"),
    Route("/counts", counts, name="counts"),
    Route("/flow/pause", pause, methods=["POST"], name="pause"),
    Route("/flow/resume", resume, methods=["POST"], name="resume"),
    Route("/flow/unpark", unpark, methods=["POST"], name="unpark"),
    Route("/flow/breaker-reset", reset_breaker, methods=["POST"], name="reset_breaker"),
    Route("/flow/unblock", unblock, methods=["POST"], name="unblock"),
]
