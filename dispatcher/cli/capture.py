"""``dispatcher capture add|list|remove``, over :class:`dispatcher.capture.Captures`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from dispatcher.capture import Capture, Captures
from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options, json_option
from dispatcher.cli.render import print_json, show, table

if TYPE_CHECKING:
    from rich.table import Table


@click.group("capture")
def capture() -> None:
    """Table capture: every insert, update and delete on a table, by any client, fans out
    as a mutation with the row's old and new values, in the writer's transaction."""


@capture.command("add")
@connection_options
@click.argument("table")
@click.option("--namespace", required=True, help="The namespace of the rows' mutations.")
@click.option("--scope", help="The scope of every row's mutations.")
@click.option("--scope-column", metavar="COLUMN", help="The column holding each row's scope.")
@click.option(
    "--key",
    "keys",
    multiple=True,
    metavar="COLUMN",
    help="A key column; repeat for a composite key [default: the primary key].",
)
@click.option(
    "--key-prefix",
    metavar="TEXT",
    help="What every key starts with; the key columns' values follow, joined with '/' "
    "[default: the table's name and '/'].",
)
def capture_add(
    dsn: str | None,
    schema: str,
    table: str,
    namespace: str,
    scope: str | None,
    scope_column: str | None,
    keys: tuple[str, ...],
    key_prefix: str | None,
) -> None:
    """Capture TABLE (as SQL names it: accounts, public.accounts, '"Odd Name"').

    An insert is a put of the new row, an update a put with the old row as its old value,
    a delete a delete with the old row; a row whose key changes is a delete of the old key
    and a put of the new one. Adding again with the same settings changes nothing; with
    others, it replaces the capture.
    """
    if (scope is None) == (scope_column is None):
        raise click.UsageError("give exactly one of --scope and --scope-column")
    found, outcome = with_connection(
        dsn,
        lambda conn: Captures(schema).add(
            conn,
            table,
            namespace=namespace,
            scope=scope,
            scope_column=scope_column,
            keys=list(keys) or None,
            key_prefix=key_prefix,
        ),
    )
    click.echo(f"capture of {found.table} {outcome}: {describe(found)}")


@capture.command("list")
@connection_options
@json_option
def capture_list(dsn: str | None, schema: str, as_json: bool) -> None:
    """List the captured tables."""
    found = with_connection(dsn, lambda conn: Captures(schema).list(conn))
    if as_json:
        print_json(found)
        return
    if not found:
        click.echo("no captured tables")
        return
    show(captures_table(found), "", f"{len(found)} captured table(s)")


@capture.command("remove")
@connection_options
@click.argument("table")
def capture_remove(dsn: str | None, schema: str, table: str) -> None:
    """Stop capturing TABLE (its trigger is dropped; rows already enqueued stay)."""
    found = with_connection(dsn, lambda conn: Captures(schema).remove(conn, table))
    click.echo(f"capture of {found.table} removed")


def describe(c: Capture) -> str:
    scope = c.scope if c.scope is not None else f"column {c.scope_column}"
    keys = "/".join(f"<{k}>" for k in c.keys)
    return f"namespace {c.namespace}, scope {scope}, keys {c.key_prefix}{keys}"


def captures_table(found: Sequence[Capture]) -> Table:
    rows = table("table", "namespace", "scope", "key", "trigger", "enabled")
    for c in found:
        rows.add_row(
            c.table,
            c.namespace,
            c.scope if c.scope is not None else f"column {c.scope_column}",
            c.key_prefix + "/".join(f"<{k}>" for k in c.keys),
            c.trigger,
            "yes" if c.enabled else "no",
        )
    return rows
