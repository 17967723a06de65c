"""``dispatcher parked list|unpark``, over :class:`dispatcher.flow.FlowControl`."""

from __future__ import annotations

import json
from collections.abc import Mapping

import click

from dispatcher.cli.options import connection_options, dry_run_option, json_option
from dispatcher.cli.render import clip, opt, print_json, show, table, when
from dispatcher.cli.targets import one_target, trigger_option, with_trigger_id
from dispatcher.core.models import JsonValue
from dispatcher.flow import MAX_UNPARK_BATCH, TriggerRef


@click.group()
def parked() -> None:
    """Rows parked on a failure an operator can clear (a missing permission, a target not
    deployed yet): list them, un-park them."""


@parked.command("list")
@connection_options
@trigger_option("Only this trigger's rows.")
@click.option("--scope", help="Only this scope's rows.")
@click.option("--limit", type=click.IntRange(1, MAX_UNPARK_BATCH), default=100, show_default=True)
@json_option
def parked_list(
    dsn: str | None,
    schema: str,
    trigger: TriggerRef | None,
    scope: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List parked rows, oldest first."""

    found = with_trigger_id(
        dsn,
        schema,
        trigger,
        lambda flow, conn, tid: flow.parked(conn, trigger_id=tid, scope=scope, limit=limit),
    )
    if as_json:
        print_json(found)
        return
    rows = table(
        "id", "scope", "trigger id", "trigger", "reason", "attempts", "parked at", "event",
        "last error",
    )  # fmt: skip
    for r in found:
        rows.add_row(
            str(r.id),
            r.scope,
            str(r.trigger_id),
            r.trigger_name,
            opt(r.reason),
            str(r.attempts),
            when(r.parked_at),
            r.event_id,
            clip(_error_message(r.last_error)),
        )
    more = " (the --limit: there may be more)" if len(found) == limit else ""
    show(rows, "", f"{len(found)} parked row(s){more}")


def _error_message(entry: JsonValue) -> str | None:
    if entry is None:
        return None
    if isinstance(entry, Mapping) and isinstance(entry.get("message"), str):
        return str(entry["message"])
    return entry if isinstance(entry, str) else json.dumps(entry, ensure_ascii=False)


@parked.command("unpark")
@connection_options
@trigger_option("Un-park this trigger's rows.")
@click.option("--scope", help="Un-park this scope's rows.")
@click.option("--all", "everything", is_flag=True, help="Un-park any trigger's rows.")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_UNPARK_BATCH),
    default=1000,
    show_default=True,
    help="Un-park at most this many (oldest first); run again for more.",
)
@dry_run_option
def parked_unpark(
    dsn: str | None,
    schema: str,
    trigger: TriggerRef | None,
    scope: str | None,
    everything: bool,
    limit: int,
    dry_run: bool,
) -> None:
    """Make parked rows due now again, attempts kept. Clear the cause first (grant the
    permission, deploy the target): a row that fails the same way parks again."""
    one_target(scope, trigger, everything)
    n = with_trigger_id(
        dsn,
        schema,
        trigger,
        lambda flow, conn, tid: flow.unpark(
            conn, trigger_id=tid, scope=scope, limit=limit, dry_run=dry_run
        ),
    )
    more = " (the --limit: run again for more)" if n == limit else ""
    click.echo(
        f"dry run: would un-park {n} parked row(s){more}" if dry_run else f"un-parked {n}{more}"
    )
