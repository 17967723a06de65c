"""``dispatcher console``: the operator console, served by uvicorn."""

from __future__ import annotations

import click

from dispatcher.cli.options import connection_options, require_dsn
from dispatcher.core.errors import DispatcherError

WEB_HINT = "the console needs the 'web' extra: pip install 'dispatcher[web]'"


@click.command()
@connection_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback needs authentication: set "
    "DISPATCHER_CONSOLE_TOKEN, or DISPATCHER_CONSOLE_USER and DISPATCHER_CONSOLE_PASSWORD.",
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--read-only", is_flag=True, help="Show every page; allow no action.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    help="Show and act on this scope only (repeat for several).",
)
@click.option(
    "--refresh",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.5, 3600),
    help="Seconds between refreshes of the live counts.",
)
def console(
    dsn: str | None,
    schema: str,
    host: str,
    port: int,
    read_only: bool,
    scopes: tuple[str, ...],
    refresh: float,
) -> None:
    """Serve the operator console: dead letters (filter, inspect, replay, discard, in bulk
    after a dry-run preview), backlog, breakers, pauses, parked rows and triggers.

    Every action is written to the audit log (shown on the Audit page).
    """
    try:
        import uvicorn

        from dispatcher.console import ConsoleSettings, auth_from_env, check_bind, create_app
    except ImportError as exc:
        raise click.ClickException(f"{WEB_HINT} ({exc.name} is missing)") from None
    try:
        settings = ConsoleSettings(
            require_dsn(dsn),
            schema=schema,
            auth=auth_from_env(),
            read_only=read_only,
            scopes=scopes or None,
            refresh_seconds=refresh,
        )
        check_bind(host, settings)
    except DispatcherError as exc:
        raise click.ClickException(str(exc)) from None
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"dispatcher console on http://{shown}:{port}/"
        + (" (read-only)" if read_only else "")
        + ("" if settings.auth is None else " (authentication required)")
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
