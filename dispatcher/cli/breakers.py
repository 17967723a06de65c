"""``dispatcher breakers list|reset``, over :class:`dispatcher.flow.FlowControl`."""

from __future__ import annotations

import click

from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options, json_option
from dispatcher.cli.render import breakers_table, print_json, show
from dispatcher.cli.targets import trigger_ref
from dispatcher.flow import FlowControl, TriggerRef


@click.group()
def breakers() -> None:
    """Circuit breakers: which are open, half-open or counting failures; reset one."""


@breakers.command("list")
@connection_options
@json_option
def breakers_list(dsn: str | None, schema: str, as_json: bool) -> None:
    """List the breakers that are open, half-open or counting failures."""
    found = with_connection(dsn, lambda conn: FlowControl(schema).breakers(conn))
    if as_json:
        print_json(found)
        return
    if not found:
        click.echo("all breakers closed, no failures counted")
        return
    show(breakers_table(found), "", f"{len(found)} breaker(s) not closed or counting failures")


@breakers.command("reset")
@connection_options
@click.argument("trigger", metavar="TRIGGER_ID", callback=trigger_ref)
def breakers_reset(dsn: str | None, schema: str, trigger: TriggerRef) -> None:
    """Close the breaker of TRIGGER_ID (an id or SCOPE/NAME) by hand, failures cleared.

    Rows it held become claimable at their due time; if the target still fails, the breaker
    opens again.
    """
    target = with_connection(dsn, lambda conn: FlowControl(schema).reset_breaker_of(conn, trigger))
    click.echo(f"breaker of {target} reset: closed")
