"""The ``dispatcher`` command line: :data:`main`, the root group, and its commands.

A module a command, or a group of subcommands, named for it: ``run``, ``migrate``, ``demo``,
``status``, ``triggers``, ``dead_letters``, ``abandoned``, ``pause`` (pause and resume),
``parked``, ``keys``, ``breakers``, ``backlog`` (``backlog-caps``), ``capture``, ``console``. Each
parses, calls the library (:mod:`dispatcher.admin`, :mod:`dispatcher.flow`,
:mod:`dispatcher.capture`, :class:`dispatcher.triggers.TriggerRegistry`) through ``call``,
and prints with ``render`` (``console`` serves :mod:`dispatcher.console` instead).
Options several commands share are declared once, in ``options`` (and, for the flow-control
commands' ``--scope``/``--trigger``/``--all``, in ``targets``).
What only one command needs (alembic, the runtime, prometheus, pgserver, rich, the web
stack) is imported when that command runs.

>>> from click.testing import CliRunner
>>> CliRunner().invoke(main, ["status", "--dsn", dsn, "--json"]).exit_code
0
"""

from __future__ import annotations

import click

from dispatcher.cli import logs
from dispatcher.cli.abandoned import abandoned
from dispatcher.cli.backlog import backlog_caps
from dispatcher.cli.breakers import breakers
from dispatcher.cli.capture import capture
from dispatcher.cli.console import console
from dispatcher.cli.dead_letters import dead_letters
from dispatcher.cli.demo import demo
from dispatcher.cli.keys import keys
from dispatcher.cli.migrate import migrate
from dispatcher.cli.parked import parked
from dispatcher.cli.pause import pause, resume
from dispatcher.cli.run import run
from dispatcher.cli.status import status
from dispatcher.cli.triggers import triggers

__all__ = ["main"]


@click.group()
@click.version_option(package_name="dispatcher")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    envvar="DISPATCHER_LOG_LEVEL",
)
def main(log_level: str) -> None:
    """Turn key/value mutations into reliable trigger executions through Postgres."""
    # The library never configures logging; its command line, an application, does.
    logs.configure(log_level)


for _command in (
    migrate,
    run,
    demo,
    status,
    triggers,
    dead_letters,
    abandoned,
    pause,
    resume,
    parked,
    keys,
    breakers,
    backlog_caps,
    capture,
    console,
):
    main.add_command(_command)
