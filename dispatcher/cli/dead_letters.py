"""``dispatcher dead-letters list|show|replay|discard|purge``, over
:class:`dispatcher.admin.Admin`."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import click

from dispatcher.admin import Admin, DeadLetterDetail, DeadLetterFilter, ReplayPolicy, ReplayReport
from dispatcher.cli.call import with_connection
from dispatcher.cli.options import connection_options, dry_run_option, duration, json_option, moment
from dispatcher.cli.render import clip, opt, print_json, retry_summary, show, table, when
from dispatcher.cli.targets import trigger_option
from dispatcher.core.errors import InvalidInput
from dispatcher.core.outcomes import DeadLetterReason, Resolution
from dispatcher.flow import TriggerRef

if TYPE_CHECKING:
    from rich.table import Table

_FILTER_OPTIONS = (
    click.option("--scope", help="Only this scope."),
    trigger_option("Only this trigger (an unknown one is an error)."),
    click.option("--trigger-id", type=int, help="Only this trigger id (as --trigger ID)."),
    click.option("--reason", type=click.Choice([r.value for r in DeadLetterReason])),
    click.option("--resolution", type=click.Choice([r.value for r in Resolution])),
    click.option(
        "--since",
        callback=moment,
        metavar="DURATION|DATETIME",
        help="Dead-lettered at/after an ISO datetime, or within a duration (e.g. 12h).",
    ),
    click.option(
        "--older-than",
        callback=moment,
        metavar="DURATION|DATETIME",
        help="Dead-lettered before an ISO datetime, or more than a duration ago (7d).",
    ),
)


def _filter_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the filter options. The command receives them, and the IDS argument where it has
    one (declared above this decorator), as one ``letters: DeadLetterFilter``."""

    # functools.wraps keeps the docstring (the help text) and the options declared below
    # this decorator (click keeps them in the function's __dict__).
    @functools.wraps(command)
    def with_filter(
        *,
        scope: str | None,
        trigger: TriggerRef | None,
        trigger_id: int | None,
        reason: str | None,
        resolution: str | None,
        since: datetime | timedelta | None,
        older_than: datetime | timedelta | None,
        ids: Sequence[int] = (),
        **rest: object,
    ) -> None:
        try:
            letters = DeadLetterFilter(
                scope=scope,
                trigger_id=trigger_id,
                reason=None if reason is None else DeadLetterReason(reason),
                resolution=None if resolution is None else Resolution(resolution),
                since=since,
                older_than=older_than,
                ids=tuple(ids) if ids else None,
            )
            if trigger is not None:
                letters = letters.for_trigger(trigger)
        except InvalidInput as exc:
            raise click.ClickException(str(exc)) from None
        command(letters=letters, **rest)

    decorated: Callable[..., None] = with_filter
    for decorate in reversed(_FILTER_OPTIONS):
        decorated = decorate(decorated)
    return decorated


def _require_selection(letters: DeadLetterFilter, everything: bool, action: str) -> None:
    if letters.is_empty and not everything:
        raise click.UsageError(
            f"refusing to {action} every dead letter: name ids or give a filter "
            "(--scope, --trigger, --reason, ...), or pass --all"
        )


def _dead_letter_id(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a dead-letter id (e.g. 12)") from None
    if n < 1:
        raise click.ClickException(f"no dead letter with id {value}: dead-letter ids are positive")
    return n


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay, discard and purge dead letters."""


@dead_letters.command("list")
@connection_options
@_filter_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@json_option
def dead_letters_list(
    dsn: str | None, schema: str, letters: DeadLetterFilter, limit: int, as_json: bool
) -> None:
    """List dead letters, newest first."""
    found = with_connection(dsn, lambda conn: Admin(schema).list_dead_letters(conn, letters, limit))
    if as_json:
        print_json(found)
        return
    rows = table(
        "id", "scope", "trigger", "reason", "resolution", "attempts", "dead-lettered",
        "last error",
    )  # fmt: skip
    for d in found:
        rows.add_row(
            str(d.id),
            d.scope,
            d.trigger_name,
            d.reason.value,
            d.resolution.value,
            str(d.attempts),
            when(d.dead_lettered_at),
            clip(d.last_error),
        )
    show(rows, "", f"{len(found)} dead letter(s)")


# "-1" is taken for the id, not for an unknown option, so that it gets the message below.
@dead_letters.command("show", context_settings={"ignore_unknown_options": True})
@connection_options
@click.argument("dead_letter_id", callback=_dead_letter_id, metavar="DEAD_LETTER_ID")
@json_option
def dead_letters_show(dsn: str | None, schema: str, dead_letter_id: int, as_json: bool) -> None:
    """Everything about dead letter DEAD_LETTER_ID: payload, policy, errors, resolution."""
    detail = with_connection(dsn, lambda conn: Admin(schema).show_dead_letter(conn, dead_letter_id))
    if as_json:
        print_json(detail)
    else:
        _print_detail(detail)


def _replay_state(d: DeadLetterDetail) -> str:
    if d.replayed_as is None:
        return "-"
    if d.replay_pending:
        return "pending in the outbox"
    if d.replay_dead_letter_id is not None:
        return f"dead-lettered again as {d.replay_dead_letter_id}"
    return "no longer in the outbox (done)"


def _print_detail(d: DeadLetterDetail) -> None:
    fields = table("field", "value")
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
        ("resolution note", opt(d.resolution_note)),
        ("replayed as", opt(d.replayed_as)),
        ("replay", _replay_state(d)),
        ("event created", when(d.event_created_at)),
        ("dead-lettered", when(d.dead_lettered_at)),
        ("resolved", when(d.resolved_at)),
        ("policy", json.dumps(d.policy, sort_keys=True)),
    ):
        fields.add_row(label, value)
    errors = table("attempt", "kind", "at", "message")
    for e in d.errors:
        errors.add_row(opt(e.attempt), opt(e.kind), when(e.at), e.message)
    show(
        f"Dead letter {d.id}",
        "",
        fields,
        "",
        f"Errors ({len(d.errors)})",
        "",
        errors,
        "",
        *_handler_parts(d),
        "Payload",
        "",
        json.dumps(d.payload, indent=2, ensure_ascii=False),
    )


def _handler_parts(d: DeadLetterDetail) -> list[str | Table]:
    """The dead-letter handlers that ran for ``d``, each with its outcome; nothing when none
    did."""
    if not d.handler_outcomes:
        return []
    handlers = table("handler", "trigger id", "outcome", "at", "error")
    for h in d.handler_outcomes:
        outcome = "-" if h.outcome is None else h.outcome.value
        handlers.add_row(opt(h.trigger), opt(h.trigger_id), outcome, when(h.at), opt(h.error))
    return [f"Handlers ({len(d.handler_outcomes)})", "", handlers, ""]


@dead_letters.command("replay")
@connection_options
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
@dry_run_option
@json_option
def dead_letters_replay(
    dsn: str | None,
    schema: str,
    letters: DeadLetterFilter,
    policy: ReplayPolicy,
    limit: int | None,
    everything: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Re-enqueue open (or handler_failed) dead letters IDS, or those matching the filters.

    Each is enqueued once, with a fresh attempt budget, and marked replayed.
    """
    _require_selection(letters, everything, "replay")
    report = with_connection(
        dsn,
        lambda conn: Admin(schema).replay(
            conn, letters, policy=policy, dry_run=dry_run, limit=limit
        ),
    )
    if as_json:
        print_json(report)
    else:
        _print_replay(report)


def _print_replay(report: ReplayReport) -> None:
    parts: list[str | Table] = []
    if report.replayed:
        replayed = table("dead letter", "scope", "trigger", "new event", "retry", "timeout")
        for r in report.replayed:
            replayed.add_row(
                str(r.dead_letter_id),
                r.scope,
                r.trigger_name,
                opt(r.event_id) if not report.dry_run else "(dry run)",
                retry_summary(r.policy),
                f"{r.timeout:g}s",
            )
        parts += [replayed, ""]
    if report.skipped:
        skipped = table("skipped", "because")
        for s in report.skipped:
            skipped.add_row(str(s.dead_letter_id), s.reason)
        parts += [skipped, ""]
    verb = "would replay" if report.dry_run else "replayed"
    prefix = "dry run: " if report.dry_run else ""
    parts.append(
        f"{prefix}{verb} {len(report.replayed)} dead letter(s) with the {report.policy} policy"
        f", skipped {len(report.skipped)}"
    )
    show(*parts)


@dead_letters.command("discard")
@connection_options
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@_filter_options
@click.option("--limit", type=click.IntRange(min=1), help="Discard at most this many.")
@click.option("--all", "everything", is_flag=True, help="Allow discarding with no filter at all.")
@dry_run_option
def dead_letters_discard(
    dsn: str | None,
    schema: str,
    letters: DeadLetterFilter,
    limit: int | None,
    everything: bool,
    dry_run: bool,
) -> None:
    """Mark open (or handler_failed) dead letters IDS, or those matching, as discarded."""
    _require_selection(letters, everything, "discard")
    n = with_connection(
        dsn, lambda conn: Admin(schema).discard(conn, letters, dry_run=dry_run, limit=limit)
    )
    click.echo(f"dry run: would discard {n} dead letter(s)" if dry_run else f"discarded {n}")


@dead_letters.command("purge")
@connection_options
@click.option(
    "--older-than",
    callback=duration,
    metavar="DURATION",
    required=True,
    help="Delete letters resolved more than this long ago (e.g. 30d).",
)
@dry_run_option
def dead_letters_purge(dsn: str | None, schema: str, older_than: timedelta, dry_run: bool) -> None:
    """Delete handled, replayed and discarded dead letters resolved before --older-than.

    Open and handler_failed letters are never deleted.
    """
    n = with_connection(
        dsn, lambda conn: Admin(schema).purge(conn, older_than=older_than, dry_run=dry_run)
    )
    click.echo(f"dry run: would purge {n} dead letter(s)" if dry_run else f"purged {n}")
