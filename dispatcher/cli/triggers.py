"""``dispatcher triggers list|add|enable|disable|remove``, over
:class:`dispatcher.triggers.TriggerRegistry`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import click

from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options, json_option
from dispatcher.cli.render import clip, print_json, retry_summary, show, table
from dispatcher.core.models import (
    PARKABLE_KINDS,
    BackoffKind,
    Delivery,
    OnDeadLetter,
    Ordering,
    RetryPolicy,
    Trigger,
)
from dispatcher.db import Connection
from dispatcher.triggers import DEFAULT_TIMEOUT, TriggerRegistry


@click.group()
def triggers() -> None:
    """List, add, enable, disable and remove triggers."""


@triggers.command("list")
@connection_options
@click.option("--scope", help="Only this scope.")
@json_option
def triggers_list(dsn: str | None, schema: str, scope: str | None, as_json: bool) -> None:
    """List triggers (all scopes unless --scope)."""
    found = with_connection(dsn, lambda conn: TriggerRegistry(schema).list(conn, scope=scope))
    if as_json:
        print_json(list(found))
        return
    # The order column only when a listed trigger is ordered: most lists have none.
    ordered = any(t.ordering is not Ordering.NONE for t in found)
    rows = table(
        "id", "scope", "name", "namespace", "pattern", "ops", "when", "fields",
        *(("order",) if ordered else ()), "target", "enabled", "dl handler", "retry", "timeout",
    )  # fmt: skip
    for t in found:
        rows.add_row(
            str(t.id),
            t.scope,
            t.name,
            t.namespace,
            t.key_pattern,
            ",".join(sorted(t.ops)),
            clip(t.condition, 60) if t.condition is not None else "",
            ",".join(t.fields) if t.fields is not None else "",
            *((_order_summary(t),) if ordered else ()),
            t.target,
            "yes" if t.enabled else "no",
            "yes" if t.is_dead_letter_handler else "no",
            retry_summary(t.retry),
            f"{t.timeout:g}s",
        )
    show(rows, "", f"{len(found)} trigger(s)")


@triggers.command("add")
@connection_options
@click.option("--scope", required=True, help="Tenant or app the trigger belongs to.")
@click.option("--name", required=True, help="Unique within the scope.")
@click.option("--namespace", required=True, help="KV namespace whose mutations it watches.")
@click.option(
    "--pattern", required=True, help="Key pattern: exact key, prefix 'users/*', or glob '*'/'?'."
)
@click.option("--target", required=True, help="What the executor runs.")
@click.option("--registered-by", required=True, help="Principal the target runs as.")
@click.option(
    "--ops",
    multiple=True,
    default=("put", "delete"),
    show_default=True,
    help="Operations that fire it: put, delete (repeat or comma-separate).",
)
@click.option("--retry-kind", type=click.Choice([k.value for k in BackoffKind]))
@click.option("--base-delay", type=float, help="Seconds before the first retry.")
@click.option("--factor", type=float, help="Growth factor (exponential, linear).")
@click.option("--max-delay", type=float, help="Cap on any delay, in seconds.")
@click.option("--jitter", type=float, help="Spread ratio in [0, 1].")
@click.option("--max-attempts", type=int, help="Attempts before the event is dead-lettered.")
@click.option(
    "--max-event-age",
    type=float,
    metavar="SECONDS",
    help="Dead-letter (reason expired) an event older than this, even with attempts left.",
)
@click.option(
    "--park-on",
    multiple=True,
    type=click.Choice(sorted(PARKABLE_KINDS)),
    metavar="KIND",
    help=f"Park, not dead-letter, on this failure kind ({', '.join(sorted(PARKABLE_KINDS))}); "
    "repeatable. Parked rows wait for `dispatcher parked unpark` or a success of the trigger.",
)
@click.option(
    "--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True, help="Seconds per run."
)
@click.option(
    "--dead-letter-handler/--no-dead-letter-handler",
    default=False,
    show_default=True,
    help="Run on the scope's new dead letters instead of on mutations.",
)
@click.option(
    "--when",
    metavar="CONDITION",
    help='Fire only for mutations meeting it, e.g. "changed(status) and new.status == '
    "'paid'\" (docs/embedding.md#conditional-triggers).",
)
@click.option(
    "--field",
    "fields",
    multiple=True,
    metavar="NAME",
    help="Deliver only this top-level field of the value and the old value; repeatable.",
)
@click.option(
    "--ordering",
    type=click.Choice([o.value for o in Ordering]),
    help="key: run a key's rows one at a time, in the commit order of its mutations "
    "(default none; key when --delivery latest).",
)
@click.option(
    "--on-dead-letter",
    type=click.Choice([o.value for o in OnDeadLetter]),
    help="Ordered triggers: block a key whose head dead-letters until an operator acts "
    "(block, the default), or let its later rows run (skip).",
)
@click.option(
    "--delivery",
    type=click.Choice([d.value for d in Delivery]),
    default=Delivery.ALL.value,
    show_default=True,
    help="latest: a mutation replaces the payload of its key's row that has not started yet.",
)
@click.option("--disabled", is_flag=True, help="Register it disabled.")
def triggers_add(
    dsn: str | None,
    schema: str,
    scope: str,
    name: str,
    namespace: str,
    pattern: str,
    target: str,
    registered_by: str,
    ops: tuple[str, ...],
    retry_kind: str | None,
    base_delay: float | None,
    factor: float | None,
    max_delay: float | None,
    jitter: float | None,
    max_attempts: int | None,
    max_event_age: float | None,
    park_on: tuple[str, ...],
    timeout: float,
    dead_letter_handler: bool,
    when: str | None,
    fields: tuple[str, ...],
    ordering: str | None,
    on_dead_letter: str | None,
    delivery: str,
    disabled: bool,
) -> None:
    """Register a trigger. Retry settings left out take RetryPolicy's defaults."""
    op_names = [o.strip() for chunk in ops for o in chunk.split(",") if o.strip()]

    async def add(conn: Connection) -> Trigger:
        # Inside the call, so that a bad value becomes an "Error:" line like any other.
        d = RetryPolicy()
        policy = RetryPolicy(
            kind=d.kind if retry_kind is None else BackoffKind(retry_kind),
            base_delay=d.base_delay if base_delay is None else base_delay,
            factor=d.factor if factor is None else factor,
            max_delay=d.max_delay if max_delay is None else max_delay,
            jitter=d.jitter if jitter is None else jitter,
            max_attempts=d.max_attempts if max_attempts is None else max_attempts,
            max_event_age=max_event_age,
            park_on=frozenset(park_on),
        )
        return await TriggerRegistry(schema).register(
            conn,
            scope=scope,
            name=name,
            namespace=namespace,
            key_pattern=pattern,
            target=target,
            registered_by=registered_by,
            ops=op_names,
            retry=policy,
            execution_timeout=timeout,
            enabled=not disabled,
            is_dead_letter_handler=dead_letter_handler,
            when=when,
            fields=list(fields) or None,
            ordering=ordering,
            on_dead_letter=on_dead_letter,
            delivery=delivery,
        )

    trigger = with_connection(dsn, add)
    state = "disabled" if disabled else "enabled"
    click.echo(f"registered trigger {trigger.id} ({trigger.scope}/{trigger.name}, {state})")


def _order_summary(t: Trigger) -> str:
    """``key, block`` / ``key, skip, latest``; empty for an unordered trigger."""
    if t.ordering is Ordering.NONE:
        return ""
    parts = [t.ordering.value, "" if t.on_dead_letter is None else t.on_dead_letter.value]
    if t.delivery is Delivery.LATEST:
        parts.append(t.delivery.value)
    return ", ".join(p for p in parts if p)


def _by_id(
    name: str,
    help: str,
    action: Callable[[TriggerRegistry, Connection, int], Awaitable[Trigger | None]],
    done: str,
) -> None:
    """Add ``triggers NAME TRIGGER_ID``: ``action`` on that trigger, then one line saying it
    is ``done`` (with its scope and name when ``action`` returns the trigger)."""

    @triggers.command(name, help=help)
    @connection_options
    @click.argument("trigger_id", type=int)
    def command(dsn: str | None, schema: str, trigger_id: int) -> None:
        t = with_connection(dsn, lambda conn: action(TriggerRegistry(schema), conn, trigger_id))
        label = str(trigger_id) if t is None else f"{t.id} ({t.scope}/{t.name})"
        click.echo(f"trigger {label} {done}")


_by_id(
    "enable",
    "Let trigger TRIGGER_ID match new mutations again.",
    TriggerRegistry.enable,
    "enabled",
)
_by_id(
    "disable",
    "Stop trigger TRIGGER_ID matching new mutations; rows already enqueued still run.",
    TriggerRegistry.disable,
    "disabled",
)
_by_id(
    "remove",
    "Delete trigger TRIGGER_ID; rows already enqueued keep their snapshot and still run.",
    TriggerRegistry.delete,
    "removed",
)
