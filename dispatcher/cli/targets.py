"""What a flow-control command (pause, resume, parked, breakers) acts on: a trigger named
by id or SCOPE/NAME, a scope, or everything."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from dispatcher.cli.call import with_connection
from dispatcher.cli.options import parsing
from dispatcher.db import Connection
from dispatcher.flow import FlowControl, TriggerRef, parse_trigger_ref

F = TypeVar("F", bound=Callable[..., None])
T = TypeVar("T")

# Option and argument callback: a trigger id, or SCOPE/NAME.
trigger_ref = parsing(parse_trigger_ref)


def trigger_option(help: str) -> Callable[[F], F]:
    """``--trigger ID|SCOPE/NAME``, passed on as a :data:`~dispatcher.flow.TriggerRef`."""
    return click.option("--trigger", callback=trigger_ref, metavar="ID|SCOPE/NAME", help=help)


def one_target(scope: str | None, trigger: TriggerRef | None, everything: bool) -> None:
    """Usage error unless exactly one of ``--scope``, ``--trigger`` and ``--all`` is given."""
    given = [
        option
        for option, value in (("--scope", scope), ("--trigger", trigger), ("--all", everything))
        if value is not None and value is not False
    ]
    if len(given) != 1:
        got = f" (got {' and '.join(given)})" if given else ""
        raise click.UsageError(f"give exactly one of --scope, --trigger or --all{got}")


def with_trigger_id(
    dsn: str | None,
    schema: str,
    trigger: TriggerRef | None,
    action: Callable[[FlowControl, Connection, int | None], Awaitable[T]],
) -> T:
    """:func:`~dispatcher.cli.call.with_connection` for a flow-control ``action``, given the
    trigger named on the command line (if any) as its id."""

    async def go(conn: Connection) -> T:
        flow = FlowControl(schema)
        tid = None if trigger is None else await flow.trigger_id(conn, trigger)
        return await action(flow, conn, tid)

    return with_connection(dsn, go)
