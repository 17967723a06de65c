"""Operator commands of the ``dispatcher`` CLI: status, triggers, dead-letters, abandoned,
and flow control (pause, resume, parked, breakers).

A thin layer over :mod:`dispatcher.admin`, :class:`dispatcher.flow.FlowControl` and
:class:`dispatcher.triggers.TriggerRegistry`:
parse options, call the API on one connection, print a table (or JSON with ``--json``).
Expected failures become one ``Error: …`` line and exit status 1, through ``_run`` of
:mod:`dispatcher.cli`.

``dispatcher.cli`` calls :func:`register` at the end of its own import, so this module must
not import ``dispatcher.cli`` at import time: under ``python -m dispatcher.cli`` that module
runs as ``__main__`` and a top-level import here would load it a second time while this one
is half-initialised. Its helpers are imported when a command runs instead.

>>> from dispatcher.cli_admin import register
>>> register(main)  # adds: status, triggers, dead-letters, abandoned, pause, resume, parked,
...                 # breakers
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TypeAlias, TypeVar

import asyncpg
import click
from rich import box
from rich.console import Console
from rich.table import Table

from dispatcher.admin import (
    Admin,
    DeadLetterDetail,
    DeadLetterFilter,
    ReplayPolicy,
    ReplayReport,
    StatusReport,
    parse_duration,
)
from dispatcher.core.errors import DispatcherError, InvalidInput, TriggerNotFound
from dispatcher.core.models import PARKABLE_KINDS, BackoffKind, JsonValue, RetryPolicy, Trigger
from dispatcher.core.outcomes import DeadLetterReason, Resolution
from dispatcher.db import Connection
from dispatcher.flow import MAX_UNPARK_BATCH, Breaker, FlowControl, ParkedRow, Pause
from dispatcher.schema import DEFAULT_SCHEMA
from dispatcher.triggers import DEFAULT_TIMEOUT, TriggerRegistry

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., None])
# A trigger named on the command line: its id, or (scope, name).
TriggerRef: TypeAlias = int | tuple[str, str]

_BIGINT_MAX = 2**63 - 1


def register(main: click.Group) -> None:
    """Add the operator commands to the ``dispatcher`` group.

    >>> register(main)
    """
    for command in (status, triggers, dead_letters, abandoned, pause, resume, parked, breakers):
        main.add_command(command)


# --- plumbing ---


def _connection_options(f: F) -> F:
    # The same --dsn and --schema as `dispatcher migrate` (see the module docstring for why
    # they are not imported from dispatcher.cli).
    f = click.option(
        "--schema",
        default=DEFAULT_SCHEMA,
        show_default=True,
        envvar="DISPATCHER_SCHEMA",
        help="Postgres schema holding dispatcher's tables.",
    )(f)
    return click.option(
        "--dsn", envvar="DATABASE_URL", help="Postgres URL (default: $DATABASE_URL)."
    )(f)


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def _dry_run_option(f: F) -> F:
    return click.option(
        "--dry-run", is_flag=True, help="Report what would change; change nothing."
    )(f)


class SchemaNotMigrated(DispatcherError):
    """The schema lacks dispatcher's tables."""


def _call(dsn: str | None, action: Callable[[Connection], Awaitable[T]]) -> T:
    """Run ``action`` on one connection; expected failures exit with one ``Error:`` line."""
    from dispatcher.cli import _dsn, _run

    target = _dsn(dsn)

    async def go() -> T:
        try:
            conn = await asyncpg.connect(target)
        except (ValueError, OverflowError) as exc:
            # A malformed URL (bad port, bad IPv6 literal). The DSN itself is not echoed:
            # it may carry a password.
            raise DispatcherError(f"invalid --dsn: {exc}") from None
        try:
            return await action(conn)
        except asyncpg.UndefinedTableError as exc:
            raise SchemaNotMigrated(
                f"{exc}: are dispatcher's tables in this schema? "
                "Run `dispatcher migrate` (with the same --schema) first"
            ) from None
        finally:
            await conn.close()

    return _run(go)


def _show(*parts: str | Table) -> None:
    """Print text lines and tables, with no trailing blanks on any line."""
    # Styles only on a terminal. A pipe or a file gets plain text, wide enough that ids,
    # UUIDs and timestamps are not wrapped; markup is off so that names like "[x]" print
    # as they are.
    tty = sys.stdout.isatty()
    console = Console(
        highlight=False,
        markup=False,
        emoji=False,
        no_color=not tty,
        width=None if tty else 220,
    )
    with console.capture() as captured:
        for part in parts:
            console.print(part, soft_wrap=isinstance(part, str))
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _table(*columns: str) -> Table:
    return Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def _jsonable(value: object) -> JsonValue:
    """Dataclasses, enums, datetimes, UUIDs and containers as plain JSON values."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _print_json(value: object) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    """Option callback: ``7d``, ``12h``, ``30m``, ``45s`` or a sum such as ``1h30m``."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except InvalidInput as exc:
        raise click.BadParameter(f"{value!r}: {exc.reason}", ctx, param) from None


def _moment(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> timedelta | datetime | None:
    """Option callback: a duration (that long ago) or an ISO datetime (naive means UTC)."""
    if value is None:
        return None
    text = value.strip()
    try:
        return parse_duration(text)
    except InvalidInput:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected a duration (7d, 12h, 30m, 45s) or an ISO datetime "
            "(2026-11-22T10:00:00Z)",
            ctx,
            param,
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- status ---


@click.command()
@_connection_options
@_json_option
def status(dsn: str | None, schema: str, as_json: bool) -> None:
    """Outbox backlog and lag, parked rows, dead letters, abandoned executions, pauses and
    circuit breakers."""
    report = _call(dsn, lambda conn: Admin(schema).status(conn))
    if as_json:
        _print_json(report)
    else:
        _print_status(report)


def _print_status(report: StatusReport) -> None:
    o = report.outbox
    oldest = "-" if o.oldest_due_seconds is None else f"{o.oldest_due_seconds:.1f}s"
    parts: list[str | Table] = [f"Status at {_when(report.at)}", ""]
    outbox = _table("outbox", "rows")
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

    letters = _table("dead letters", "count")
    for resolution, n in report.dead_letters_by_resolution.items():
        letters.add_row(resolution.value, str(n))
    parts += [letters, ""]

    if report.unresolved_by_reason:
        reasons = _table("unresolved by reason", "count")
        for reason, n in report.unresolved_by_reason.items():
            reasons.add_row(reason.value, str(n))
        parts += [reasons, ""]

    if report.top_backlog:
        top = _table("trigger id", "scope", "trigger", "backlog", "due now", "parked")
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

    if report.pauses:
        parts += ["Paused", "", _pauses_table(report.pauses), ""]
    else:
        parts += ["paused: nothing", ""]
    if report.breakers:
        parts += ["Circuit breakers", "", _breakers_table(report.breakers)]
    else:
        parts.append("circuit breakers: all closed")
    _show(*parts)


def _pauses_table(pauses: Sequence[Pause]) -> Table:
    table = _table("paused", "since", "note")
    for p in pauses:
        table.add_row(p.target, _when(p.paused_at), _opt(p.note))
    return table


def _breakers_table(found: Sequence[Breaker]) -> Table:
    table = _table(
        "trigger id", "scope", "trigger", "state", "failures", "open until", "opened", "updated"
    )
    for b in found:
        table.add_row(
            str(b.trigger_id),
            _opt(b.scope),
            _opt(b.trigger_name),
            b.state,
            str(b.failures),
            _when(b.open_until),
            f"{b.opened_count}x",
            _when(b.updated_at),
        )
    return table


# --- triggers ---


@click.group()
def triggers() -> None:
    """List, add, enable, disable and remove triggers."""


@triggers.command("list")
@_connection_options
@click.option("--scope", help="Only this scope.")
@_json_option
def triggers_list(dsn: str | None, schema: str, scope: str | None, as_json: bool) -> None:
    """List triggers (all scopes unless --scope)."""
    found = _call(dsn, lambda conn: TriggerRegistry(schema).list(conn, scope=scope))
    if as_json:
        _print_json(list(found))
        return
    table = _table(
        "id", "scope", "name", "namespace", "pattern", "ops", "target", "enabled", "dl handler",
        "retry", "timeout",
    )  # fmt: skip
    for t in found:
        table.add_row(
            str(t.id),
            t.scope,
            t.name,
            t.namespace,
            t.key_pattern,
            ",".join(sorted(t.ops)),
            t.target,
            "yes" if t.enabled else "no",
            "yes" if t.is_dead_letter_handler else "no",
            _retry_summary(t.retry),
            f"{t.timeout:g}s",
        )
    _show(table, "", f"{len(found)} trigger(s)")


def _retry_summary(p: RetryPolicy) -> str:
    age = "" if p.max_event_age is None else f" age<={p.max_event_age:g}s"
    park = "" if not p.park_on else f" park_on={','.join(sorted(p.park_on))}"
    return (
        f"{p.kind.value} x{p.max_attempts} base={p.base_delay:g}s factor={p.factor:g} "
        f"max={p.max_delay:g}s jitter={p.jitter:g}{age}{park}"
    )


@triggers.command("add")
@_connection_options
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
    disabled: bool,
) -> None:
    """Register a trigger. Retry settings left out take RetryPolicy's defaults."""
    op_names = [o.strip() for chunk in ops for o in chunk.split(",") if o.strip()]

    async def add(conn: Connection) -> Trigger:
        # Inside _call, so that a bad value becomes an "Error:" line like any other.
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
        )

    trigger = _call(dsn, add)
    state = "disabled" if disabled else "enabled"
    click.echo(f"registered trigger {trigger.id} ({trigger.scope}/{trigger.name}, {state})")


@triggers.command("enable")
@_connection_options
@click.argument("trigger_id", type=int)
def triggers_enable(dsn: str | None, schema: str, trigger_id: int) -> None:
    """Let trigger TRIGGER_ID match new mutations again."""
    t = _call(dsn, lambda conn: TriggerRegistry(schema).enable(conn, trigger_id))
    click.echo(f"trigger {t.id} ({t.scope}/{t.name}) enabled")


@triggers.command("disable")
@_connection_options
@click.argument("trigger_id", type=int)
def triggers_disable(dsn: str | None, schema: str, trigger_id: int) -> None:
    """Stop trigger TRIGGER_ID matching new mutations; rows already enqueued still run."""
    t = _call(dsn, lambda conn: TriggerRegistry(schema).disable(conn, trigger_id))
    click.echo(f"trigger {t.id} ({t.scope}/{t.name}) disabled")


@triggers.command("remove")
@_connection_options
@click.argument("trigger_id", type=int)
def triggers_remove(dsn: str | None, schema: str, trigger_id: int) -> None:
    """Delete trigger TRIGGER_ID; rows already enqueued keep their snapshot and still run."""
    _call(dsn, lambda conn: TriggerRegistry(schema).delete(conn, trigger_id))
    click.echo(f"trigger {trigger_id} removed")


# --- dead letters ---


def _filter_options(f: F) -> F:
    decorators = [
        click.option("--scope", help="Only this scope."),
        click.option("--trigger", help="Only this trigger name."),
        click.option("--trigger-id", type=int, help="Only this trigger id."),
        click.option("--reason", type=click.Choice([r.value for r in DeadLetterReason])),
        click.option("--resolution", type=click.Choice([r.value for r in Resolution])),
        click.option(
            "--since",
            callback=_moment,
            metavar="DURATION|DATETIME",
            help="Dead-lettered at/after an ISO datetime, or within a duration (e.g. 12h).",
        ),
        click.option(
            "--older-than",
            callback=_moment,
            metavar="DURATION|DATETIME",
            help="Dead-lettered before an ISO datetime, or more than a duration ago (7d).",
        ),
    ]
    for decorate in reversed(decorators):
        f = decorate(f)
    return f


def _build_filter(
    *,
    scope: str | None,
    trigger: str | None,
    trigger_id: int | None,
    reason: str | None,
    resolution: str | None,
    since: datetime | timedelta | None,
    older_than: datetime | timedelta | None,
    ids: Sequence[int] = (),
) -> DeadLetterFilter:
    try:
        return DeadLetterFilter(
            scope=scope,
            trigger=trigger,
            trigger_id=trigger_id,
            reason=None if reason is None else DeadLetterReason(reason),
            resolution=None if resolution is None else Resolution(resolution),
            since=since,
            older_than=older_than,
            ids=tuple(ids) if ids else None,
        )
    except InvalidInput as exc:
        raise click.ClickException(str(exc)) from None


def _require_selection(f: DeadLetterFilter, everything: bool, action: str) -> None:
    if f.is_empty and not everything:
        raise click.UsageError(
            f"refusing to {action} every dead letter: name ids or give a filter "
            "(--scope, --trigger, --reason, ...), or pass --all"
        )


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay, discard and purge dead letters."""


@dead_letters.command("list")
@_connection_options
@_filter_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@_json_option
def dead_letters_list(
    dsn: str | None,
    schema: str,
    scope: str | None,
    trigger: str | None,
    trigger_id: int | None,
    reason: str | None,
    resolution: str | None,
    since: datetime | timedelta | None,
    older_than: datetime | timedelta | None,
    limit: int,
    as_json: bool,
) -> None:
    """List dead letters, newest first."""
    f = _build_filter(
        scope=scope,
        trigger=trigger,
        trigger_id=trigger_id,
        reason=reason,
        resolution=resolution,
        since=since,
        older_than=older_than,
    )
    found = _call(dsn, lambda conn: Admin(schema).list_dead_letters(conn, f, limit))
    if as_json:
        _print_json(found)
        return
    table = _table(
        "id", "scope", "trigger", "reason", "resolution", "attempts", "dead-lettered",
        "last error",
    )  # fmt: skip
    for d in found:
        table.add_row(
            str(d.id),
            d.scope,
            d.trigger_name,
            d.reason.value,
            d.resolution.value,
            str(d.attempts),
            _when(d.dead_lettered_at),
            _clip(d.last_error),
        )
    _show(table, "", f"{len(found)} dead letter(s)")


def _clip(text: str | None, limit: int = 80) -> str:
    # The first line only: error messages may carry a traceback after it.
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "-")
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dead_letters.command("show")
@_connection_options
@click.argument("dead_letter_id", type=int)
@_json_option
def dead_letters_show(dsn: str | None, schema: str, dead_letter_id: int, as_json: bool) -> None:
    """Everything about dead letter DEAD_LETTER_ID: payload, policy, errors, resolution."""
    detail = _call(dsn, lambda conn: Admin(schema).show_dead_letter(conn, dead_letter_id))
    if as_json:
        _print_json(detail)
    else:
        _print_detail(detail)


def _print_detail(d: DeadLetterDetail) -> None:
    fields = _table("field", "value")
    replay = "-"
    if d.replayed_as is not None:
        if d.replay_pending:
            replay = "pending in the outbox"
        elif d.replay_dead_letter_id is not None:
            replay = f"dead-lettered again as {d.replay_dead_letter_id}"
        else:
            replay = "no longer in the outbox (done)"
    for label, value in (
        ("scope", d.scope),
        ("trigger", f"{d.trigger_name} (id {d.trigger_id})"),
        ("target", d.target),
        ("registered by", d.registered_by),
        ("event", str(d.event_id)),
        ("depth", str(d.depth)),
        ("attempts", str(d.attempts)),
        ("reason", d.reason.value),
        ("resolution", d.resolution.value),
        ("resolution note", _opt(d.resolution_note)),
        ("replayed as", _opt(d.replayed_as)),
        ("replay", replay),
        ("event created", _when(d.event_created_at)),
        ("dead-lettered", _when(d.dead_lettered_at)),
        ("resolved", _when(d.resolved_at)),
        ("policy", json.dumps(d.policy, sort_keys=True)),
    ):
        fields.add_row(label, value)
    errors = _table("attempt", "kind", "at", "message")
    for e in d.errors:
        errors.add_row(_opt(e.attempt), _opt(e.kind), _when(e.at), e.message)
    _show(
        f"Dead letter {d.id}",
        "",
        fields,
        "",
        f"Errors ({len(d.errors)})",
        "",
        errors,
        "",
        "Payload",
        "",
        json.dumps(d.payload, indent=2, ensure_ascii=False),
    )


@dead_letters.command("replay")
@_connection_options
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@_filter_options
@click.option(
    "--policy",
    type=click.Choice(["original", "current"]),
    default="original",
    show_default=True,
    help="Retry policy of the new rows: the dead letter's snapshot, or the trigger's now.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), help="Replay at most this many (oldest first)."
)
@click.option("--all", "everything", is_flag=True, help="Allow replaying with no filter at all.")
@_dry_run_option
@_json_option
def dead_letters_replay(
    dsn: str | None,
    schema: str,
    ids: tuple[int, ...],
    policy: ReplayPolicy,
    limit: int | None,
    everything: bool,
    dry_run: bool,
    as_json: bool,
    scope: str | None,
    trigger: str | None,
    trigger_id: int | None,
    reason: str | None,
    resolution: str | None,
    since: datetime | timedelta | None,
    older_than: datetime | timedelta | None,
) -> None:
    """Re-enqueue open (or handler_failed) dead letters IDS, or those matching the filters.

    Each is enqueued once, with a fresh attempt budget, and marked replayed.
    """
    f = _build_filter(
        scope=scope,
        trigger=trigger,
        trigger_id=trigger_id,
        reason=reason,
        resolution=resolution,
        since=since,
        older_than=older_than,
        ids=ids,
    )
    _require_selection(f, everything, "replay")
    report = _call(
        dsn,
        lambda conn: Admin(schema).replay(conn, f, policy=policy, dry_run=dry_run, limit=limit),
    )
    if as_json:
        _print_json(report)
    else:
        _print_replay(report)


def _print_replay(report: ReplayReport) -> None:
    parts: list[str | Table] = []
    if report.replayed:
        table = _table("dead letter", "scope", "trigger", "new event", "retry", "timeout")
        for r in report.replayed:
            table.add_row(
                str(r.dead_letter_id),
                r.scope,
                r.trigger_name,
                _opt(r.event_id) if not report.dry_run else "(dry run)",
                _retry_summary(r.policy),
                f"{r.timeout:g}s",
            )
        parts += [table, ""]
    if report.skipped:
        skipped = _table("skipped", "because")
        for s in report.skipped:
            skipped.add_row(str(s.dead_letter_id), s.reason)
        parts += [skipped, ""]
    verb = "would replay" if report.dry_run else "replayed"
    prefix = "dry run: " if report.dry_run else ""
    parts.append(
        f"{prefix}{verb} {len(report.replayed)} dead letter(s) with the {report.policy} policy"
        f", skipped {len(report.skipped)}"
    )
    _show(*parts)


@dead_letters.command("discard")
@_connection_options
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@_filter_options
@click.option("--limit", type=click.IntRange(min=1), help="Discard at most this many.")
@click.option("--all", "everything", is_flag=True, help="Allow discarding with no filter at all.")
@_dry_run_option
def dead_letters_discard(
    dsn: str | None,
    schema: str,
    ids: tuple[int, ...],
    limit: int | None,
    everything: bool,
    dry_run: bool,
    scope: str | None,
    trigger: str | None,
    trigger_id: int | None,
    reason: str | None,
    resolution: str | None,
    since: datetime | timedelta | None,
    older_than: datetime | timedelta | None,
) -> None:
    """Mark open (or handler_failed) dead letters IDS, or those matching, as discarded."""
    f = _build_filter(
        scope=scope,
        trigger=trigger,
        trigger_id=trigger_id,
        reason=reason,
        resolution=resolution,
        since=since,
        older_than=older_than,
        ids=ids,
    )
    _require_selection(f, everything, "discard")
    n = _call(dsn, lambda conn: Admin(schema).discard(conn, f, dry_run=dry_run, limit=limit))
    click.echo(f"dry run: would discard {n} dead letter(s)" if dry_run else f"discarded {n}")


@dead_letters.command("purge")
@_connection_options
@click.option(
    "--older-than",
    callback=_duration,
    metavar="DURATION",
    required=True,
    help="Delete letters resolved more than this long ago (e.g. 30d).",
)
@_dry_run_option
def dead_letters_purge(dsn: str | None, schema: str, older_than: timedelta, dry_run: bool) -> None:
    """Delete handled, replayed and discarded dead letters resolved before --older-than.

    Open and handler_failed letters are never deleted.
    """
    n = _call(dsn, lambda conn: Admin(schema).purge(conn, older_than=older_than, dry_run=dry_run))
    click.echo(f"dry run: would purge {n} dead letter(s)" if dry_run else f"purged {n}")


# --- abandoned executions ---


@click.group()
def abandoned() -> None:
    """Synchronous results nobody was left to receive."""


@abandoned.command("list")
@_connection_options
@click.option("--scope", help="Only this scope.")
@click.option(
    "--since",
    callback=_moment,
    metavar="DURATION|DATETIME",
    help="At/after an ISO datetime, or within a duration (e.g. 1h).",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@_json_option
def abandoned_list(
    dsn: str | None,
    schema: str,
    scope: str | None,
    since: datetime | timedelta | None,
    limit: int,
    as_json: bool,
) -> None:
    """List abandoned executions, newest first."""
    found = _call(dsn, lambda conn: Admin(schema).list_abandoned(conn, limit, since, scope=scope))
    if as_json:
        _print_json(found)
        return
    table = _table("id", "at", "scope", "trigger id", "target", "status", "outcome", "detail")
    for a in found:
        detail = a.error if a.outcome == "failure" else json.dumps(a.result, ensure_ascii=False)
        table.add_row(
            str(a.id),
            _when(a.created_at),
            a.scope,
            str(a.trigger_id),
            a.target,
            str(a.status),
            a.outcome,
            _clip(detail),
        )
    _show(table, "", f"{len(found)} abandoned execution(s)")


# --- flow control ---

_TRIGGER_ID = re.compile(r"[0-9]+")


def _trigger_ref(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> TriggerRef | None:
    """Option callback: a trigger id, or SCOPE/NAME (split at the first ``/``)."""
    if value is None:
        return None
    text = value.strip()
    if _TRIGGER_ID.fullmatch(text):
        number = int(text)
        if 1 <= number <= _BIGINT_MAX:
            return number
    else:
        scope, _, name = text.partition("/")
        if scope and name:
            return scope, name
    raise click.BadParameter(
        f"{value!r}: expected a trigger id (e.g. 7) or SCOPE/NAME (e.g. acme/welcome)", ctx, param
    )


def _trigger_option(help: str) -> Callable[[F], F]:
    return click.option("--trigger", callback=_trigger_ref, metavar="ID|SCOPE/NAME", help=help)


async def _trigger_id(conn: Connection, schema: str, ref: TriggerRef) -> int:
    """The id of a trigger named by id (taken as it is: a deleted trigger may still have
    pauses, parked rows or a breaker) or by scope and name (looked up)."""
    if isinstance(ref, int):
        return ref
    scope, name = ref
    return (await TriggerRegistry(schema).get_by_name(conn, scope, name)).id


def _one_target(scope: str | None, trigger: TriggerRef | None, everything: bool) -> None:
    given = [
        option
        for option, value in (("--scope", scope), ("--trigger", trigger), ("--all", everything))
        if value is not None and value is not False
    ]
    if len(given) != 1:
        got = f" (got {' and '.join(given)})" if given else ""
        raise click.UsageError(f"give exactly one of --scope, --trigger or --all{got}")


async def _target_text(
    conn: Connection, schema: str, scope: str | None, trigger_id: int | None, ref: TriggerRef | None
) -> str:
    """What a command acted on, worded as :attr:`dispatcher.flow.Pause.target` words it."""
    if trigger_id is not None:
        if isinstance(ref, tuple):
            return f"trigger {trigger_id} ({ref[1]})"
        try:
            name = (await TriggerRegistry(schema).get(conn, trigger_id)).name
        except TriggerNotFound:  # deleted: its pause or breaker may outlive it
            return f"trigger {trigger_id}"
        return f"trigger {trigger_id} ({name})"
    if scope is not None:
        return f"scope {scope}"
    return "everything"


@click.command()
@_connection_options
@click.option("--scope", help="Pause every trigger of this scope.")
@_trigger_option("Pause this trigger.")
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
    _one_target(scope, trigger, everything)

    async def go(conn: Connection) -> Pause:
        tid = None if trigger is None else await _trigger_id(conn, schema, trigger)
        return await FlowControl(schema).pause(
            conn, scope=scope, trigger_id=tid, everything=everything, note=note
        )

    p = _call(dsn, go)
    click.echo(f"paused {p.target}" + ("" if p.note is None else f"; note: {p.note}"))


@click.command()
@_connection_options
@click.option("--scope", help="Lift the pause of this scope.")
@_trigger_option("Lift the pause of this trigger.")
@click.option(
    "--all", "everything", is_flag=True, help="Lift the pause of everything (only that one)."
)
def resume(
    dsn: str | None, schema: str, scope: str | None, trigger: TriggerRef | None, everything: bool
) -> None:
    """Lift exactly one pause: a trigger's, a scope's, or the pause of everything.

    Other pauses stay (`dispatcher status` lists them). Dispatchers are woken at once.
    """
    _one_target(scope, trigger, everything)

    async def go(conn: Connection) -> str:
        flow = FlowControl(schema)
        tid = None if trigger is None else await _trigger_id(conn, schema, trigger)
        target = await _target_text(conn, schema, scope, tid, trigger)
        if await flow.resume(conn, scope=scope, trigger_id=tid, everything=everything):
            return target
        active = [p.target for p in await flow.pauses(conn)]
        now = f"paused now: {', '.join(active)}" if active else "nothing is paused"
        raise DispatcherError(f"{target} is not paused ({now})")

    click.echo(f"resumed {_call(dsn, go)}")


@click.group()
def parked() -> None:
    """Rows parked on a failure an operator can clear (a missing permission, a target not
    deployed yet): list them, un-park them."""


@parked.command("list")
@_connection_options
@_trigger_option("Only this trigger's rows.")
@click.option("--scope", help="Only this scope's rows.")
@click.option("--limit", type=click.IntRange(1, MAX_UNPARK_BATCH), default=100, show_default=True)
@_json_option
def parked_list(
    dsn: str | None,
    schema: str,
    trigger: TriggerRef | None,
    scope: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List parked rows, oldest first."""

    async def go(conn: Connection) -> list[ParkedRow]:
        tid = None if trigger is None else await _trigger_id(conn, schema, trigger)
        return await FlowControl(schema).parked(conn, trigger_id=tid, scope=scope, limit=limit)

    found = _call(dsn, go)
    if as_json:
        _print_json(found)
        return
    table = _table(
        "id", "scope", "trigger id", "trigger", "reason", "attempts", "parked at", "event",
        "last error",
    )  # fmt: skip
    for r in found:
        table.add_row(
            str(r.id),
            r.scope,
            str(r.trigger_id),
            r.trigger_name,
            _opt(r.reason),
            str(r.attempts),
            _when(r.parked_at),
            r.event_id,
            _clip(_error_message(r.last_error)),
        )
    more = " (the --limit: there may be more)" if len(found) == limit else ""
    _show(table, "", f"{len(found)} parked row(s){more}")


def _error_message(entry: JsonValue) -> str | None:
    if entry is None:
        return None
    if isinstance(entry, Mapping) and isinstance(entry.get("message"), str):
        return str(entry["message"])
    return entry if isinstance(entry, str) else json.dumps(entry, ensure_ascii=False)


@parked.command("unpark")
@_connection_options
@_trigger_option("Un-park this trigger's rows.")
@click.option("--scope", help="Un-park this scope's rows.")
@click.option("--all", "everything", is_flag=True, help="Un-park any trigger's rows.")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_UNPARK_BATCH),
    default=1000,
    show_default=True,
    help="Un-park at most this many (oldest first); run again for more.",
)
@_dry_run_option
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
    _one_target(scope, trigger, everything)

    async def go(conn: Connection) -> int:
        tid = None if trigger is None else await _trigger_id(conn, schema, trigger)
        return await FlowControl(schema).unpark(
            conn, trigger_id=tid, scope=scope, limit=limit, dry_run=dry_run
        )

    n = _call(dsn, go)
    more = " (the --limit: run again for more)" if n == limit else ""
    click.echo(
        f"dry run: would un-park {n} parked row(s){more}" if dry_run else f"un-parked {n}{more}"
    )


@click.group()
def breakers() -> None:
    """Circuit breakers: which are open, half-open or counting failures; reset one."""


@breakers.command("list")
@_connection_options
@_json_option
def breakers_list(dsn: str | None, schema: str, as_json: bool) -> None:
    """List the breakers that are open, half-open or counting failures."""
    found = _call(dsn, lambda conn: FlowControl(schema).breakers(conn))
    if as_json:
        _print_json(found)
        return
    if not found:
        click.echo("all breakers closed, no failures counted")
        return
    _show(_breakers_table(found), "", f"{len(found)} breaker(s) not closed or counting failures")


@breakers.command("reset")
@_connection_options
@click.argument("trigger", metavar="TRIGGER_ID", callback=_trigger_ref)
def breakers_reset(dsn: str | None, schema: str, trigger: TriggerRef) -> None:
    """Close the breaker of TRIGGER_ID (an id or SCOPE/NAME) by hand, failures cleared.

    Rows it held become claimable at their due time; if the target still fails, the breaker
    opens again.
    """

    async def go(conn: Connection) -> str:
        tid = await _trigger_id(conn, schema, trigger)
        target = await _target_text(conn, schema, None, tid, trigger)
        if not await FlowControl(schema).reset_breaker(conn, tid):
            raise DispatcherError(f"{target} has no breaker (it never counted a failure)")
        return target

    click.echo(f"breaker of {_call(dsn, go)} reset: closed")
