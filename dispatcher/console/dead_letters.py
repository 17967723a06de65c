"""The dead-letter pages: the filtered list (keyset pages), one letter in full, and the
actions on them, replay (with the original or the current policy) and discard, for one
letter or in bulk by the list's filter, each confirmed after a dry-run preview."""

from __future__ import annotations

from collections.abc import Mapping
from typing import get_args

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dispatcher.admin import DeadLetterFilter, PageCursor, ReplayPolicy
from dispatcher.admin.filters import check_actionable
from dispatcher.admin.pages import SEARCH_BUDGET
from dispatcher.console.context import Console, console_of
from dispatcher.console.forms import FilterForm
from dispatcher.console.security import action_form
from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue
from dispatcher.core.outcomes import DeadLetterReason, Resolution

ACTIONS = ("replay", "discard")
POLICIES: tuple[str, ...] = get_args(ReplayPolicy)


def _action(params: Mapping[str, str]) -> tuple[str, ReplayPolicy]:
    action = params.get("action") or ""
    policy = params.get("policy") or "original"
    if action not in ACTIONS:
        raise InvalidInput("action", action, f"must be one of {list(ACTIONS)}")
    if policy == "original":
        return action, "original"
    if policy == "current":
        return action, "current"
    raise InvalidInput("policy", policy, f"must be one of {list(POLICIES)}")


async def list_letters(request: Request) -> Response:
    console = console_of(request)
    form = FilterForm.read(request.query_params)
    f = form.to_filter(console.settings.scopes)
    after_text = request.query_params.get("after")
    after = PageCursor.parse(after_text) if after_text else None
    async with console.connection() as conn:
        page = await console.admin.dead_letter_page(
            conn, f, after=after, limit=console.settings.page_size
        )
        triggers = [t for t in await console.registry.list(conn) if console.within(t.scope)]
    return console.render(
        request,
        "dead_letters.html",
        {
            # The counts come after the page (counting a big table takes longer than a page).
            "counts": None,
            "search_budget": f"{SEARCH_BUDGET:,}",
            "form": form,
            "page": page,
            "first_page": after is None,
            "triggers": triggers,
            "reasons": [r.value for r in DeadLetterReason],
            "resolutions": [r.value for r in Resolution],
            "actionable": form.resolution in ("", "any", "open", "handler_failed"),
            "notice": request.query_params.get("notice"),
        },
    )


async def _letter_filter(console: Console, id: int) -> DeadLetterFilter:
    return DeadLetterFilter(ids=(id,), scopes=console.settings.scopes)


async def show_letter(request: Request) -> Response:
    console = console_of(request)
    id: int = request.path_params["id"]
    async with console.connection() as conn:
        letter = await console.admin.show_dead_letter(conn, id)
    if not console.within(letter.scope):
        raise HTTPException(404, f"no dead letter with id {id} in this console's scopes")
    return console.render(
        request,
        "dead_letter.html",
        {
            "letter": letter,
            "actionable": letter.resolution in (Resolution.OPEN, Resolution.HANDLER_FAILED),
            "notice": request.query_params.get("notice"),
        },
    )


async def preview_letter(request: Request) -> Response:
    """What replaying or discarding one letter would do: a dry run of the action itself."""
    console = console_of(request)
    id: int = request.path_params["id"]
    action, policy = _action(request.query_params)
    async with console.connection() as conn:
        letter = await console.admin.show_dead_letter(conn, id)
        if not console.within(letter.scope):
            raise HTTPException(404, f"no dead letter with id {id} in this console's scopes")
        f = await _letter_filter(console, id)
        report = None
        count = 0
        if action == "replay":
            report = await console.admin.replay(conn, f, policy=policy, dry_run=True)
            count = len(report.replayed)
        else:
            count = await console.admin.discard(conn, f, dry_run=True)
    return console.render(
        request,
        "letter_preview.html",
        {"letter": letter, "action": action, "policy": policy, "report": report, "count": count},
    )


async def act_on_letter(request: Request) -> Response:
    console = console_of(request)
    id: int = request.path_params["id"]
    form = await action_form(request, console.settings)
    action, policy = _action(form)
    f = await _letter_filter(console, id)
    async with console.connection() as conn, conn.transaction():
        letter = await console.admin.show_dead_letter(conn, id)
        if not console.within(letter.scope):
            raise HTTPException(404, f"no dead letter with id {id} in this console's scopes")
        detail: dict[str, JsonValue] = {}
        if action == "replay":
            report = await console.admin.replay(conn, f, policy=policy)
            count = len(report.replayed)
            detail = {"policy": policy}
            if report.replayed:
                notice = f"replayed as event {report.replayed[0].event_id} ({policy} policy)"
                detail["event_id"] = str(report.replayed[0].event_id)
            else:
                why = report.skipped[0].reason if report.skipped else "nothing to replay"
                notice = f"not replayed: {why}"
                detail["skipped"] = why
        else:
            count = await console.admin.discard(conn, f)
            notice = "discarded" if count else f"not discarded: it is {letter.resolution.value}"
        await console.audit(
            conn,
            request,
            f"dead_letters.{action}",
            count=count,
            scope=letter.scope,
            target=f"dead letter {id}",
            detail=detail or None,
        )
    return console.back(request, "dead_letter", notice, id=id)


def _bulk_filter(console: Console, form: FilterForm, action: str) -> DeadLetterFilter:
    f = form.to_filter(console.settings.scopes)
    check_actionable(f, action)
    return f


async def preview_bulk(request: Request) -> Response:
    """How many letters, of which triggers, a bulk action by the list's filter would act on;
    the operator confirms from here."""
    console = console_of(request)
    form = FilterForm.read(request.query_params)
    action, policy = _action(request.query_params)
    f = _bulk_filter(console, form, action)
    async with console.connection() as conn:
        preview = await console.admin.preview_bulk(conn, f)
    return console.render(
        request,
        "bulk_preview.html",
        {"form": form, "action": action, "policy": policy, "preview": preview},
    )


async def act_in_bulk(request: Request) -> Response:
    console = console_of(request)
    fields = await action_form(request, console.settings)
    form = FilterForm.read(fields)
    action, policy = _action(fields)
    expected_text = fields.get("expected", "")
    if not expected_text.isdigit() or int(expected_text) < 1:
        raise InvalidInput("expected", expected_text, "confirm a preview that found letters")
    # Never more than the operator saw in the preview: letters dead-lettered since wait for
    # the next preview.
    expected = int(expected_text)
    f = _bulk_filter(console, form, action)
    async with console.connection() as conn, conn.transaction():
        detail: dict[str, JsonValue] = {"previewed": expected}
        if action == "replay":
            report = await console.admin.replay(conn, f, policy=policy, limit=expected)
            count = len(report.replayed)
            detail["policy"] = policy
            detail["skipped"] = len(report.skipped)
            notice = f"replayed {count} dead letters ({policy} policy)"
        else:
            count = await console.admin.discard(conn, f, limit=expected)
            notice = f"discarded {count} dead letters"
        await console.audit(
            conn,
            request,
            f"dead_letters.bulk_{action}",
            count=count,
            scope=f.scope or (f.scopes[0] if f.scopes and len(f.scopes) == 1 else None),
            filter=form.audit(),
            detail=detail,
        )
    url = request.url_for("dead_letters").include_query_params(**form.fields(), notice=notice)
    return console.redirect(str(url))


routes = [
    Route("/dead-letters", list_letters, name="dead_letters"),
    Route("/dead-letters/preview", preview_bulk, name="bulk_preview"),
    Route("/dead-letters/bulk", act_in_bulk, methods=["POST"], name="bulk_act"),
    Route("/dead-letters/{id:int}", show_letter, name="dead_letter"),
    Route("/dead-letters/{id:int}/preview", preview_letter, name="letter_preview"),
    Route("/dead-letters/{id:int}/act", act_on_letter, methods=["POST"], name="letter_act"),
]
