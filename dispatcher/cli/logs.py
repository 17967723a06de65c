"""The command line's logging set-up (the library never configures logging; its command line,
an application, does): one stderr handler whose formatter keeps every record's fields, text
or JSON (:mod:`dispatcher.log_format`)."""

from __future__ import annotations

import logging
import sys

import click

from dispatcher.log_format import LogFormat, TextFormatter, formatter

# The handler main() installed (None when the root logger already had one, e.g. under a test
# runner: those are left alone).
_installed: logging.Handler | None = None
_format: LogFormat = "text"


def configure(level: str) -> None:
    """Log at ``level`` and above to stderr, text with fields, unless the process already
    configured logging."""
    global _installed
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    _installed = handler if handler in logging.getLogger().handlers else None


def use_format(kind: LogFormat) -> None:
    """Switch the installed handler (and :func:`say`) to ``kind``."""
    global _format
    _format = kind
    if _installed is not None:
        _installed.setFormatter(formatter(kind))


def say(message: str, event: str, **fields: object) -> None:
    """A line for the operator on stderr, whatever the log level: plain text, or under
    ``--log-format json`` a JSON object like the log records' (logger ``dispatcher.cli``)."""
    if _format == "text":
        click.echo(message, err=True)
        return
    record = logging.LogRecord("dispatcher.cli", logging.INFO, __file__, 0, message, None, None)
    record.__dict__.update(event=event, **fields)
    click.echo(formatter("json").format(record), err=True)
