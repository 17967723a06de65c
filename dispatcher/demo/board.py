"""What the demo shows: its introduction and the live table of counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from dispatcher.demo.scenario import SCOPE, TRIGGERS
from dispatcher.postgres import ProvidedPostgres
from dispatcher.runtime.stats import Stats


def _intro(pg: ProvidedPostgres, schema: str) -> Group:
    where = "the Postgres given by --dsn" if pg.source == "env" else "an embedded Postgres"
    triggers = Table.grid(padding=(0, 2))
    for t in TRIGGERS:
        triggers.add_row(f"  {t.name}", t.pattern, t.story)
    return Group(
        f"dispatcher demo on {where}, schema {schema!r}.",
        f"Five triggers in the scope {SCOPE!r}, each showing one part of the flow:",
        triggers,
    )


_THIS_RUN = "written during this run, in the database"
_MEANINGS = {
    "executed": "handler calls, retries included",
    "succeeded": "calls that returned",
    "retried": "failures rescheduled with backoff",
    "dead-lettered": "rows out of attempts (billing accounts)",
    "dead letters handled": "resolved by the dead-letter handler",
    "depth cutoffs": "loop rows stopped by the depth limit",
    "sync replies": "answers a caller waited for",
    "abandoned sync replies": "answers nobody waited for (slow quote)",
}


@dataclass
class _Board:
    """The one table the demo shows: this process's counts as they change, then the rows
    read back from the database."""

    stats: Stats
    read_back: dict[str, tuple[int, str]] = field(default_factory=dict)
    caption: str | None = "running…"

    def render(self) -> Table:
        t = Table(title="dispatcher demo", caption=self.caption)
        t.add_column("what")
        t.add_column("count", justify="right")
        t.add_column("meaning")
        counts = {
            "executed": self.stats.executed,
            "succeeded": self.stats.succeeded,
            "retried": self.stats.retried,
            "dead-lettered": self.stats.dead_lettered,
            "dead letters handled": self.stats.handled,
            "depth cutoffs": self.stats.depth_exceeded,
            "sync replies": self.stats.replies,
            "abandoned sync replies": self.stats.abandoned,
        }
        for what, n in counts.items():
            t.add_row(what, str(n), _MEANINGS[what])
        for what, (n, meaning) in self.read_back.items():
            t.add_row(what, str(n), meaning)
        return t


@contextlib.contextmanager
def _shown(board: _Board, console: Console) -> Iterator[None]:
    """Show ``board`` live; leave its last state on the screen, once."""
    try:
        with Live(get_renderable=board.render, console=console):
            try:
                yield
            except BaseException:
                board.caption = "stopped early"
                raise
            board.caption = None
    finally:
        if not console.is_terminal:
            console.line()  # rich ends a live display with a new line only on a terminal
