"""``dispatcher migrate``."""

from __future__ import annotations

import click

from dispatcher.cli.call import run_async
from dispatcher.cli.options import connection_options, require_dsn


@click.command()
@connection_options
def migrate(dsn: str | None, schema: str) -> None:
    """Create or upgrade dispatcher's tables (safe to run from several processes at once)."""
    # alembic loads here, not with the CLI.
    from dispatcher.migrate import migrate as run_migrate

    target = require_dsn(dsn)
    revision = run_async(lambda: run_migrate(target, schema=schema))
    click.echo(f"schema {schema!r} at revision {revision}")
