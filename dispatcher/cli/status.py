"""``dispatcher status``: one snapshot of :meth:`dispatcher.admin.Admin.status`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from dispatcher.admin import Admin, StatusReport
from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options, json_option
from dispatcher.cli.render import breakers_table, pauses_table, print_json, show, table, when
from dispatcher.core.health import DEFAULT_READY_WINDOW

if TYPE_CHECKING:
    from rich.table import Table


@click.command()
@connection_options
@click.option(
    "--ready-window",
    default=DEFAULT_READY_WINDOW,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds a claimable row may wait before the progress verdict is 'not ready'.",
)
@json_option
def status(dsn: str | None, schema: str, ready_window: float, as_json: bool) -> None:
    """Progress verdict, outbox backlog and lag, parked rows, dead letters, abandoned
    executions, blocked keys, pauses and circuit breakers."""
    report = with_connection(
        dsn, lambda conn: Admin(schema).status(conn, ready_window=ready_window)
    )
    if as_json:
        print_json(report)
    else:
        _print_status(report)


def _print_status(report: StatusReport) -> None:
    o = report.outbox
    oldest = "-" if o.oldest_due_seconds is None else f"{o.oldest_due_seconds:.1f}s"
    verdict = "ready" if report.progress.ready else "NOT READY"
    parts: list[str | Table] = [
        f"Status at {when(report.at)}",
        "",
        f"progress: {verdict} ({report.progress.reason})",
        "",
    ]
    outbox = table("outbox", "rows")
    for label, n in (
        ("due now", o.due_now),
        ("scheduled later", o.scheduled),
        ("in lease", o.leased),
        ("parked", o.parked),
        ("total", o.total),
    ):
        outbox.add_row(label, str(n))
    outbox.add_row("oldest due", oldest)
    parts += [outbox, ""]

    letters = table("dead letters", "count")
    for resolution, n in report.dead_letters_by_resolution.items():
        letters.add_row(resolution.value, str(n))
    parts += [letters, ""]

    if report.unresolved_by_reason:
        reasons = table("unresolved by reason", "count")
        for reason, n in report.unresolved_by_reason.items():
            reasons.add_row(reason.value, str(n))
        parts += [reasons, ""]

    if report.top_backlog:
        top = table("trigger id", "scope", "trigger", "backlog", "due now", "parked")
        for t in report.top_backlog:
            top.add_row(
                str(t.trigger_id),
                t.scope,
                t.trigger_name,
                str(t.total),
                str(t.due_now),
                str(t.parked),
            )
        parts += ["Top backlog", "", top, ""]
    parts += [f"abandoned executions: {report.abandoned_executions}", ""]
    if report.blocked_keys:
        parts += [
            f"blocked keys: {report.blocked_keys} (ordered triggers held by a dead head; "
            "see `dispatcher keys blocked`)",
            "",
        ]

    if report.pauses:
        parts += ["Paused", "", pauses_table(report.pauses), ""]
    else:
        parts += ["paused: nothing", ""]
    if report.breakers:
        parts += ["Circuit breakers", "", breakers_table(report.breakers)]
    else:
        parts.append("circuit breakers: all closed")
    show(*parts)
