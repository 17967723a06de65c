"""``dispatcher pause`` and ``dispatcher resume``, over :class:`dispatcher.flow.FlowControl`."""

from __future__ import annotations

import click

from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options
from dispatcher.cli.targets import one_target, trigger_option, with_trigger_id
from dispatcher.flow import FlowControl, TriggerRef


@click.command()
@connection_options
@click.option("--scope", help="Pause every trigger of this scope.")
@trigger_option("Pause this trigger.")
@click.option("--all", "everything", is_flag=True, help="Pause everything: every scope.")
@click.option("--note", help="Why (shown by `dispatcher status`).")
def pause(
    dsn: str | None,
    schema: str,
    scope: str | None,
    trigger: TriggerRef | None,
    everything: bool,
    note: str | None,
) -> None:
    """Stop claiming the rows of a trigger, a scope, or everything, in every dispatcher.

    Rows keep accumulating and nothing is dropped; in-flight executions finish. Pausing what
    is already paused replaces its note.
    """
    one_target(scope, trigger, everything)
    p = with_trigger_id(
        dsn,
        schema,
        trigger,
        lambda flow, conn, tid: flow.pause(
            conn, scope=scope, trigger_id=tid, everything=everything, note=note
        ),
    )
    click.echo(f"paused {p.target}" + ("" if p.note is None else f"; note: {p.note}"))


@click.command()
@connection_options
@click.option("--scope", help="Lift the pause of this scope.")
@trigger_option("Lift the pause of this trigger.")
@click.option(
    "--all", "everything", is_flag=True, help="Lift the pause of everything (only that one)."
)
def resume(
    dsn: str | None, schema: str, scope: str | None, trigger: TriggerRef | None, everything: bool
) -> None:
    """Lift exactly one pause: a trigger's, a scope's, or the pause of everything.

    Other pauses stay (`dispatcher status` lists them). Dispatchers are woken at once.
    """
    one_target(scope, trigger, everything)
    target = with_connection(
        dsn,
        lambda conn: FlowControl(schema).resume_target(
            conn, scope=scope, trigger=trigger, everything=everything
        ),
    )
    click.echo(f"resumed {target}")
