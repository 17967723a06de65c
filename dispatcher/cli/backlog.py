"""``dispatcher backlog-caps set|list|remove``, over :class:`dispatcher.flow.FlowControl`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options, json_option, parsing
from dispatcher.cli.render import print_json, show, table, when
from dispatcher.core.models import check_name
from dispatcher.flow import (
    DEFAULT_RECOUNT_INTERVAL,
    BacklogCap,
    FlowControl,
    parse_max_pending,
    parse_recount_interval,
)

if TYPE_CHECKING:
    from rich.table import Table

# "-1" would otherwise be read as an unknown option, with a message that does not say what
# the value should be.
_NUMBERS_MAY_BE_NEGATIVE = {"ignore_unknown_options": True}
_scope = parsing(lambda text: check_name("scope", text))


@click.group("backlog-caps")
def backlog_caps() -> None:
    """Caps on a scope's pending rows: past its cap, an emit for the scope is refused
    (BacklogFull, SQLSTATE 54Q01) and nothing already queued is dropped."""


@backlog_caps.command("set", context_settings=_NUMBERS_MAY_BE_NEGATIVE)
@connection_options
@click.argument("scope", callback=_scope)
@click.argument("max_pending", metavar="N", callback=parsing(parse_max_pending))
@click.option(
    "--recount-interval",
    metavar="SECONDS",
    callback=parsing(parse_recount_interval),
    help=f"Count the scope's pending rows again after this long [default: "
    f"{DEFAULT_RECOUNT_INTERVAL:g}].",
)
def backlog_caps_set(
    dsn: str | None,
    schema: str,
    scope: str,
    max_pending: int,
    recount_interval: float | None,
) -> None:
    """Cap SCOPE at N pending rows (or change its cap); its backlog is counted now.

    A soft cap: rows enqueued since the last count are not in it, so a scope may pass its
    cap by what producers commit for it within one recount interval.
    """
    interval = DEFAULT_RECOUNT_INTERVAL if recount_interval is None else recount_interval
    cap = with_connection(
        dsn,
        lambda conn: FlowControl(schema).set_backlog_cap(
            conn, scope, max_pending, recount_interval=interval
        ),
    )
    full = " (full: emits are refused)" if cap.pending >= cap.max_pending else ""
    click.echo(
        f"backlog cap of scope {cap.scope}: {cap.max_pending} pending rows, recounted every "
        f"{cap.recount_interval:g}s; backlog now {cap.pending}{full}"
    )


@backlog_caps.command("list")
@connection_options
@json_option
def backlog_caps_list(dsn: str | None, schema: str, as_json: bool) -> None:
    """List the backlog caps, with each scope's pending rows as last counted."""
    found = with_connection(dsn, lambda conn: FlowControl(schema).backlog_caps(conn))
    if as_json:
        print_json(found)
        return
    if not found:
        click.echo("no backlog caps")
        return
    show(caps_table(found), "", f"{len(found)} backlog cap(s)")


@backlog_caps.command("remove")
@connection_options
@click.argument("scope", callback=_scope)
def backlog_caps_remove(dsn: str | None, schema: str, scope: str) -> None:
    """Lift the backlog cap of SCOPE."""
    removed = with_connection(dsn, lambda conn: FlowControl(schema).remove_backlog_cap(conn, scope))
    if not removed:
        raise click.ClickException(f"scope {scope} has no backlog cap")
    click.echo(f"backlog cap of scope {scope} removed")


def caps_table(found: Sequence[BacklogCap]) -> Table:
    rows = table("scope", "cap", "pending", "counted", "recount every", "updated")
    for c in found:
        full = " (full)" if c.pending >= c.max_pending else ""
        rows.add_row(
            c.scope,
            str(c.max_pending),
            f"{c.pending}{full}",
            when(c.counted_at),
            f"{c.recount_interval:g}s",
            when(c.updated_at),
        )
    return rows
