"""``dispatcher keys blocked|unblock``: the keys of ordered triggers held by a dead head, over
:class:`dispatcher.flow.FlowControl`."""

from __future__ import annotations

import click

from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options, json_option
from dispatcher.cli.render import opt, print_json, show, table, when
from dispatcher.cli.targets import trigger_option, trigger_ref
from dispatcher.db import Connection
from dispatcher.flow import MAX_UNPARK_BATCH, FlowControl, TriggerRef


@click.group()
def keys() -> None:
    """Keys of ordered triggers (ordering="key") whose head dead-lettered and blocks them:
    list them, unblock (skip) them. Replaying or discarding the dead letter unblocks its key
    too."""


@keys.command("blocked")
@connection_options
@trigger_option("Only this trigger's keys.")
@click.option("--scope", help="Only this scope's keys.")
@click.option("--limit", type=click.IntRange(1, MAX_UNPARK_BATCH), default=100, show_default=True)
@json_option
def keys_blocked(
    dsn: str | None,
    schema: str,
    trigger: TriggerRef | None,
    scope: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List blocked keys, oldest first, with the dead letter holding each and how many
    rows wait behind it."""
    found = with_connection(
        dsn,
        lambda conn: FlowControl(schema).blocked_keys(
            conn, trigger=trigger, scope=scope, limit=limit
        ),
    )
    if as_json:
        print_json(found)
        return
    rows = table(
        "scope", "trigger id", "trigger", "key", "version", "dead letter", "reason",
        "resolution", "waiting", "blocked at",
    )  # fmt: skip
    for k in found:
        rows.add_row(
            k.scope,
            str(k.trigger_id),
            k.trigger_name,
            k.key,
            opt(None if k.seq is None else str(k.seq)),
            str(k.dead_letter_id),
            opt(k.reason),
            opt(k.resolution),
            str(k.waiting),
            when(k.blocked_at),
        )
    more = " (the --limit: there may be more)" if len(found) == limit else ""
    show(rows, "", f"{len(found)} blocked key(s){more}")


@keys.command("unblock")
@connection_options
@click.option(
    "--trigger",
    required=True,
    callback=trigger_ref,
    metavar="ID|SCOPE/NAME",
    help="The ordered trigger.",
)
@click.option("--key", help="The key to unblock.")
@click.option("--all", "everything", is_flag=True, help="Every blocked key of the trigger.")
def keys_unblock(
    dsn: str | None, schema: str, trigger: TriggerRef, key: str | None, everything: bool
) -> None:
    """Skip a blocked key's dead head: its later rows run, in order. The dead letter stays
    open; replay or discard it apart (either would have unblocked the key as well)."""
    if (key is None) == (not everything):
        raise click.UsageError("give exactly one of --key or --all")

    async def go(conn: Connection) -> int:
        return await FlowControl(schema).unblock(conn, trigger, key)

    n = with_connection(dsn, go)
    if n == 0 and key is not None:
        raise click.ClickException(f"key {key!r} is not blocked for that trigger")
    click.echo(f"unblocked {n} key(s)")
