"""The audit page: every action taken through the console, newest first."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dispatcher.admin.filters import check_id
from dispatcher.console.context import console_of

AUDIT_PAGE = 100


async def audit(request: Request) -> Response:
    console = console_of(request)
    before_text = request.query_params.get("before")
    before = check_id("before", int(before_text)) if before_text and before_text.isdigit() else None
    async with console.connection() as conn:
        rows = await console.admin.audit_log(
            conn, before=before, scopes=console.settings.scopes, limit=AUDIT_PAGE + 1
        )
    more = len(rows) > AUDIT_PAGE
    rows = rows[:AUDIT_PAGE]
    return console.render(
        request,
        "audit.html",
        {"rows": rows, "next_before": rows[-1].id if more and rows else None},
    )


routes = [Route("/audit", audit, name="audit")]
