"""``dispatcher demo``."""

from __future__ import annotations

import logging

import click

from dispatcher.cli.call import run_async
from dispatcher.cli.options import dsn_option


@click.command()
@dsn_option("Postgres URL (default: $DATABASE_URL; without it an embedded server is started).")
@click.option("--orders", default=200, show_default=True, help="How many order mutations.")
def demo(dsn: str | None, orders: int) -> None:
    """Show the whole flow: retries, dead letters and their handler, a depth cutoff, sync
    replies. Needs no setup: starts an embedded Postgres when no DSN is given."""
    # The demo brings the runtime, rich's live display and (without a DSN) pgserver.
    from rich.console import Console

    from dispatcher.demo import run_demo

    # The live table tells the story; per-row warnings would scroll it away.
    logging.getLogger("dispatcher").setLevel(logging.ERROR)
    run_async(lambda: run_demo(dsn, Console(), orders=orders))
