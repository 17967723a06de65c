"""``dispatcher abandoned list``, over :meth:`dispatcher.admin.Admin.list_abandoned`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import click

from dispatcher.admin import Admin
from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options, json_option, moment
from dispatcher.cli.render import clip, print_json, show, table, when


@click.group()
def abandoned() -> None:
    """Synchronous results nobody was left to receive."""


@abandoned.command("list")
@connection_options
@click.option("--scope", help="Only this scope.")
@click.option(
    "--since",
    callback=moment,
    metavar="DURATION|DATETIME",
    help="At/after an ISO datetime, or within a duration (e.g. 1h).",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@json_option
def abandoned_list(
    dsn: str | None,
    schema: str,
    scope: str | None,
    since: datetime | timedelta | None,
    limit: int,
    as_json: bool,
) -> None:
    """List abandoned executions, newest first."""
    found = with_connection(
        dsn, lambda conn: Admin(schema).list_abandoned(conn, limit, since, scope=scope)
    )
    if as_json:
        print_json(found)
        return
    rows = table("id", "at", "scope", "trigger id", "target", "status", "outcome", "detail")
    for a in found:
        detail = a.error if a.outcome == "failure" else json.dumps(a.result, ensure_ascii=False)
        rows.add_row(
            str(a.id),
            when(a.created_at),
            a.scope,
            str(a.trigger_id),
            a.target,
            str(a.status),
            a.outcome,
            clip(detail),
        )
    show(rows, "", f"{len(found)} abandoned execution(s)")
