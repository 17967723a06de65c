"""How commands print: tables (styled on a terminal, plain text in a pipe), JSON, and the
cell formats several commands share.

rich is imported when a table is built, not when the CLI loads: it costs about 80 ms, and
``dispatcher --help`` or a command that prints one line needs none of it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING

import click

from dispatcher.core.models import JsonValue, RetryPolicy

if TYPE_CHECKING:
    from rich.table import Table

    from dispatcher.flow import Breaker, Pause


def show(*parts: str | Table) -> None:
    """Print text lines and tables, with no trailing blanks on any line."""
    from rich.console import Console

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


def table(*columns: str) -> Table:
    from rich import box
    from rich.table import Table

    return Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def opt(value: object) -> str:
    return "-" if value is None else str(value)


def clip(text: str | None, limit: int = 80) -> str:
    # The first line only: error messages may carry a traceback after it.
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "-")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def jsonable(value: object) -> JsonValue:
    """Dataclasses, enums, datetimes, UUIDs and containers as plain JSON values."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((jsonable(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)


def print_json(value: object) -> None:
    click.echo(json.dumps(jsonable(value), indent=2, ensure_ascii=False))


def retry_summary(p: RetryPolicy) -> str:
    age = "" if p.max_event_age is None else f" age<={p.max_event_age:g}s"
    park = "" if not p.park_on else f" park_on={','.join(sorted(p.park_on))}"
    return (
        f"{p.kind.value} x{p.max_attempts} base={p.base_delay:g}s factor={p.factor:g} "
        f"max={p.max_delay:g}s jitter={p.jitter:g}{age}{park}"
    )


def pauses_table(pauses: Sequence[Pause]) -> Table:
    rows = table("paused", "since", "note")
    for p in pauses:
        rows.add_row(p.target, when(p.paused_at), opt(p.note))
    return rows


def breakers_table(found: Sequence[Breaker]) -> Table:
    rows = table(
        "trigger id",
        "scope",
        "trigger",
        "state",
        "failures",
        "open until",
        "rate-limited until",
        "opened",
        "updated",
    )
    for b in found:
        rows.add_row(
            str(b.trigger_id),
            opt(b.scope),
            opt(b.trigger_name),
            b.state,
            str(b.failures),
            when(b.open_until),
            when(b.held_until),
            f"{b.opened_count}x",
            when(b.updated_at),
        )
    return rows
